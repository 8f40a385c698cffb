"""bertfast.kernels: Triton kernels, one file per op.

Importing a kernel module registers its ``bertfast::`` custom ops with torch.library.
Set ``TRITON_INTERPRET=1`` before importing triton to run them on the CPU (tests).
"""
