"""KVM: the userspace ABI, the host's MMU mode, what memslots cost the kernel, a real VM and a
model of it, the accelerator that turns sections into memslots, the host description, and a
probe vCPU.
"""
