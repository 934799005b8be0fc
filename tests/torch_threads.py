"""Torch's default thread pool fights XLA's for the 2 CPU cores (100x slower): parity tests use one thread."""
import contextlib


@contextlib.contextmanager
def torch_one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            yield
    finally:
        torch.set_num_threads(threads)
