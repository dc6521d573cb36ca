"""KVM: the userspace ABI, a real VM, a model of it, what memslots cost the kernel, the accelerator
that turns sections into memslots, a probe vCPU, and the host it describes.
"""
