"""The guest side: a model of Linux's virtio_mem driver and the clock it runs on."""
