"""Publishing a finished conversion: verify it, write its model card, upload it to the Hub."""

from __future__ import annotations

import glob
from pathlib import Path

from .errors import ConvertError
from .hub_errors import hub_errors
from .output import STATE_DIR, conversion_files, read_conversion_info, write_bytes_atomic
from .report import size_line
from .verify import CHECKS, VerifyReport, verify

MODEL_CARD = "README.md"
IGNORE_PATTERNS = [f"{STATE_DIR}/*", "*.partial", MODEL_CARD]  # the card goes up on its own, once built
TAGS = ["nvfp4", "modelopt", "fp4", "quantized", "nvfp4-convert"]
_LICENSE_KEYS = ("license", "license_name", "license_link")


def push(out: Path, repo_id: str, *, private: bool = False, token: str | None = None, endpoint: str | None = None,
         commit_message: str | None = None) -> str:
    """Verify ``out`` and upload it to ``repo_id`` with a model card (``README.md``) made for it.

    The card is written into ``out`` too, once the upload has succeeded; a failed upload leaves ``out``
    as it was.

    Args:
        out: a finished conversion's output folder.
        repo_id: the Hub repo to create (if needed) and upload to, e.g. ``me/Llama-3.1-8B-NVFP4``.
        private: create the repo private (no effect on an existing repo).
        token: Hub token with write access (else ``HF_TOKEN`` or the stored login); never recorded.
        endpoint: Hub endpoint URL.
        commit_message: the commit message (default: names the tool and format).

    Returns:
        The repo URL.

    Raises:
        ConvertError: when ``out`` is not a finished conversion, fails verification, or the upload fails.
    """
    out = Path(out)
    info = read_conversion_info(out)
    if info is None:
        raise ConvertError("not a finished conversion", where=str(out),
                           fix="Finish the conversion first (re-run the same convert command to resume)")
    report = verify(out, progress=False)
    if not report.ok:
        first = report.violations[0]
        raise ConvertError(f"refusing to upload: verify found {len(report.violations)} violation(s), first: "
                           f"{first.line()}", where=str(out), fix="Run `nvfp4-convert verify OUT` for the list, "
                           "then re-convert into a fresh folder")
    card = model_card(info=info, report=report, repo_id=repo_id, license=info.get("license") or {})
    if token and len(token) >= 8:  # belt and braces: the recorded command never holds one
        card = card.replace(token, "***")

    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    with hub_errors(repo_id, endpoint=endpoint, upload=True):
        url = api.create_repo(repo_id, private=private or None, exist_ok=True, repo_type="model")
        # Only what the conversion wrote (the card follows): never files of the user's that share the folder.
        allow = [glob.escape(name) for name in conversion_files(out)]
        api.upload_folder(repo_id=repo_id, folder_path=out, repo_type="model", ignore_patterns=IGNORE_PATTERNS,
                          allow_patterns=allow,
                          commit_message=commit_message or f"Upload {info['quant_algo']} checkpoint ({info['tool']})")
        api.upload_file(repo_id=repo_id, path_or_fileobj=card.encode(), path_in_repo=MODEL_CARD, repo_type="model",
                        commit_message="Model card")
    write_bytes_atomic(out / MODEL_CARD, card.encode())  # only once the Hub has it: OUT matches the repo
    return str(url)


def card_license(text: str) -> dict[str, str]:
    """``license`` / ``license_name`` / ``license_link`` from a model card's front matter."""
    from huggingface_hub import ModelCard

    meta = ModelCard(text, ignore_metadata_errors=True).data
    return {k: str(v) for k, v in meta.to_dict().items() if k in _LICENSE_KEYS and v}


def model_card(*, info: dict, report: VerifyReport, repo_id: str, license: dict[str, str]) -> str:
    """The ``README.md`` for a converted checkpoint, from its conversion facts and verify report."""
    from huggingface_hub import ModelCard, ModelCardData

    base = _base_model(info)
    data = ModelCardData(base_model=base, library_name="transformers", tags=list(TAGS), **license,
                         base_model_relation="quantized")
    text = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(_body(info, report, repo_id, base)) + "\n"
    ModelCard(text)  # raises if the front matter does not parse
    return text


def _base_model(info: dict) -> str | None:
    """The source repo id for a Hub source (recorded as ``org/name@sha``); None for a local folder."""
    if not info.get("source_revision"):
        return None
    return str(info["source"]).rsplit("@", 1)[0]


def _calibration_lines(calibration: dict | None) -> list[str]:
    if not calibration:
        return []
    where = calibration["dataset"] + "".join(f", {k} `{calibration[k]}`" for k in ("split", "column")
                                             if calibration.get(k))
    return [f"- **Calibration:** {calibration['samples']} samples x {calibration['seq_len']} tokens of {where}; "
            f"method: {calibration['method']}"
            + (f"; block scales: {calibration['block_scales']}." if calibration.get("block_scales") else ".")]


def _body(info: dict, report: VerifyReport, repo_id: str, base: str | None) -> list[str]:
    name = repo_id.rsplit("/", 1)[-1]
    weight_only = info["quant_algo"] == "W4A16_NVFP4"
    origin = f"[{base}](https://huggingface.co/{base})" if base else "a local checkpoint"
    exclude = info.get("exclude_modules") or []
    lines = [
        f"# {name}",
        "",
        f"NVFP4 quantization of {origin}, in NVIDIA ModelOpt's checkpoint format (`quant_method: modelopt`, "
        f"`quant_algo: {info['quant_algo']}`), made with {info['tool']}.",
        "",
        "## What was quantized",
        "",
        f"- **{info['quantized_modules']} Linear weights** in NVFP4: 4-bit E2M1 values, one FP8-E4M3 scale per "
        "16 elements and an FP32 global scale (`weight_scale_2`), shared within fused groups (q/k/v, gate/up).",
        f"- **{info['kept_tensors']} tensors kept** byte-identical to the source (embeddings, norms, "
        "routers, `lm_head` and anything excluded).",
        f"- **Activations:** {info['activation_policy']}.",
        *_calibration_lines(info.get("calibration")),
        f"- **Recipe:** `{info['recipe']['name']}`.",
        f"- **Excluded modules** ({len(exclude)}, `exclude_modules` in `hf_quant_config.json` and `ignore` in "
        "`config.json`):",
        "",
        "<details><summary>list</summary>",
        "",
        "```",
        *exclude,
        "```",
        "",
        "</details>",
        "",
        "## Size",
        "",
        f"Weights: {size_line(info['bytes_in'], info['bytes_out'])}.",
        "",
        "## Serving",
        "",
        *(_serving_weight_only(repo_id) if weight_only else _serving(repo_id)),
        "",
        "## How it was made",
        "",
        f"- Tool: {info['tool']}",
        f"- Source: {origin}" + (f" at commit `{info['source_revision']}`" if info.get("source_revision") else ""),
        "- Command:",
        "",
        "```bash",
        info.get("command") or "(not recorded)",
        "```",
        "",
        "## Verification",
        "",
        "`nvfp4-convert verify` checked the format invariants serving engines rely on before upload:",
        "",
        "| check | items | result |",
        "|---|---:|---|",
        *[f"| {c} | {report.checked[c]} | {_result(report, c)} |" for c in CHECKS
          if report.source is not None or c not in ("error vs source", "kept vs source")],
    ]
    if stats := report.sqnr_stats():
        lines += ["", f"Quantization error vs the source: median SQNR {stats[0]:.1f} dB, worst {stats[1]:.1f} dB."]
    return lines


def _result(report: VerifyReport, check: str) -> str:
    failed = sum(v.check == check for v in report.violations)
    return f"FAIL ({failed})" if failed else "pass"


def _serving(repo_id: str) -> list[str]:
    return [
        "NVFP4 (W4A4) runs natively on NVIDIA Blackwell GPUs (B200, GB200, RTX PRO 6000, RTX 50 series).",
        "On Hopper (H100/H200) vLLM runs it as W4A16 through its Marlin FP4 kernels (4-bit weights, "
        "16-bit activations).",
        "",
        "**vLLM** detects the format from `config.json`; `--quantization modelopt_fp4` makes it explicit:",
        "",
        "```bash",
        f"vllm serve {repo_id}",
        "```",
        "",
        "**SGLang**:",
        "",
        "```bash",
        f"python -m sglang.launch_server --model-path {repo_id} --quantization modelopt_fp4",
        "```",
        "",
        "**TensorRT-LLM** (reads `hf_quant_config.json`):",
        "",
        "```bash",
        f"trtllm-serve {repo_id}",
        "```",
    ]


def _serving_weight_only(repo_id: str) -> list[str]:
    return [
        "This is a weight-only checkpoint (`W4A16_NVFP4`: 4-bit weights, 16-bit activations). Recent vLLM "
        "serves it (Marlin kernels, Hopper and Blackwell); SGLang and released TensorRT-LLM versions do not "
        "accept this `quant_algo` yet.",
        "",
        "```bash",
        f"vllm serve {repo_id}",
        "```",
    ]
