"""One folder per op: reference.py (PyTorch oracle) beside the Triton kernels and the public function."""
