"""The test oracle: ModelOpt 0.47's own export of a checkpoint, with the arithmetic it has on a GPU."""

from __future__ import annotations

import warnings

import pytest
import torch

from cuda_division import CudaScalarDivision


def modelopt_export(src, dst):
    warnings.filterwarnings("ignore")
    transformers = pytest.importorskip("transformers")
    mtq = pytest.importorskip("modelopt.torch.quantization")
    from modelopt.torch.export import export_hf_checkpoint

    torch.manual_seed(0)
    config = transformers.AutoConfig.from_pretrained(src)
    vision = hasattr(config, "vision_config")  # calibrated on text alone: only the language model is quantized
    auto = transformers.AutoModelForImageTextToText if vision else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(src, dtype=torch.bfloat16)
    vocab = config.get_text_config().vocab_size

    def calibrate(m):
        m(input_ids=torch.randint(0, vocab, (2, 16)))

    with CudaScalarDivision() as mode:
        export_hf_checkpoint(mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, calibrate), export_dir=dst)
    assert mode.count > 0
