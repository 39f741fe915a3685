"""The GPU check's parity section: LayeredModel (resident and streamed) against transformers in
memory, fp16, greedy, on the trimmed SmolLM2 that `benchmarks/prepare_gpu_check.py` put in `.gpu/`.
Run by benchmarks/gpu_check.py."""

from __future__ import annotations

from pathlib import Path

import torch

from common import count_places, opened, out

# --- greedy parity on real weights ---------------------------------------------------------

PROMPT = "What is the capital of France? Answer in one sentence."
PARITY_MODES = [("resident", "1TB", "1TB"), ("streamed from disk", "0", "0"), ("streamed from pinned RAM", "0", "1TB")]


def load_smollm2(assets: Path, work: Path):
    """(its tokenizer, a plain checkpoint folder) from the trimmed GGUF."""
    ggufs = sorted((assets / "smollm2-trim").glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no GGUF in {assets / 'smollm2-trim'}; run `python benchmarks/prepare_gpu_check.py` first")
    from transformers import AutoConfig, AutoTokenizer

    from reshard.demo import gguf_to_checkpoint

    path = ggufs[0]
    folder = gguf_to_checkpoint(path, work / "smollm2-hf", tokenizer_from=path.parent / "tokenizer")
    layers = AutoConfig.from_pretrained(folder).num_hidden_layers
    out(f"parity model: {path.name} (SmolLM2-135M-Instruct TRIMMED to {layers} layers: "
        f"real weights, not SmolLM2's text)")
    return AutoTokenizer.from_pretrained(folder), folder


def parity(args, device: torch.device, work: Path) -> list[str]:
    """What failed: greedy tokens that differ from transformers', streamed logits that differ at all
    from the resident model's (same device, dtype and modules: exactness holds)."""
    from reshard.convert import convert

    tokenizer, folder = load_smollm2(args.assets, work)
    convert(str(folder), work / "smollm2-reshard", dtype="float16", progress=False)
    want, want_logits, ids, gen = reference_greedy(folder, tokenizer, device, args.dry)
    failures, resident = [], None
    for name, gpu, cpu in PARITY_MODES:
        got, got_logits, places = layered_greedy(work / "smollm2-reshard", device, gpu, cpu, ids, gen)
        resident = got_logits if resident is None else resident
        same, exact = torch.equal(got.cpu(), want.cpu()), (got_logits - resident).abs().max().item()
        failures += [] if same else [f"parity: {name} tokens differ from transformers'"]
        failures += [] if exact == 0 else [f"parity: {name} logits differ from resident by {exact:.3g}"]
        out(f"LayeredModel {name} ({places}): tokens {'MATCH' if same else 'DIFFER'}; prompt logits vs resident: "
            f"max |diff| {exact:.3g} ({'EXACT' if exact == 0 else 'DIFFER'}), vs transformers: max |diff| "
            f"{(got_logits - want_logits).abs().max().item():.3g}: {tokenizer.decode(got)!r}")
    return failures


def reference_greedy(folder: Path, tokenizer, device: torch.device, dry: bool):
    """transformers in memory, fp16: (greedy tokens, prompt logits, prompt ids, generate kwargs)."""
    from transformers import AutoModelForCausalLM

    dtype = torch.float16
    # Load the reference as a user would (from_pretrained with dtype), so buffers such as the
    # rotary table are built exactly as transformers builds them for that dtype.
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval().to(device)
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
    gen = dict(max_new_tokens=6 if dry else 24, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    with torch.inference_mode():
        logits = ref(ids).logits.float()
        want = ref.generate(ids, **gen)[0, ids.shape[1]:]
    out(f"transformers in memory, {dtype}, {device.type}: {tokenizer.decode(want)!r}")
    return want, logits, ids, gen


def layered_greedy(folder: Path, device: torch.device, gpu: str, cpu: str, ids, gen):
    """LayeredModel with the given budgets: (greedy tokens, prompt logits, where its groups were)."""
    with opened(folder, device, gpu, cpu) as model:
        logits = model(ids).logits.float()
        return model.generate(ids, **gen)[0, ids.shape[1]:], logits, count_places(model.places)
