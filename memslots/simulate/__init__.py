"""Resize traces through the guest model, recorded and plotted."""
