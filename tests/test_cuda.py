"""CUDA paths, where a GPU is visible (skipped elsewhere). benchmarks/gpu_paths.py checks more on a lent GPU:
a gallery built on CUDA against float64, its certificates attacked, throughput."""
import pytest
import torch

from encoder import load_encoder
from encoder.protocol import measure_float_error

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")


@cuda
@pytest.mark.parametrize("spec", ["lipsim:demo", "lipsim:cpu-tiny"])
def test_lipschitz_embeddings_on_cuda_run_in_full_float32_even_when_tf32_was_on(spec):
    # torch's default lets cuDNN convolve in TF32: lipsim:demo's float error then measured 0.010 on an H200 (the
    # slack of every certificate), against 1.1e-5 on the CPU.
    torch.backends.cudnn.allow_tf32 = True
    enc = load_encoder(spec, device="cuda")
    cpu = load_encoder(spec, device="cpu")
    eps = measure_float_error(enc)
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert eps < 10 * measure_float_error(cpu) + 1e-6, eps
    x = torch.rand(4, 3, enc.input_size, enc.input_size)
    with torch.inference_mode():
        assert (enc.embed(x).cpu() - cpu.embed(x)).norm(dim=1).max() < 1e-4
