"""The machine: pc layout, device plugging order, guests, resize jobs."""
