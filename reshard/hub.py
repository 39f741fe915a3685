"""Fetch only the files a conversion needs from the Hugging Face hub.

Weights: safetensors when the repo has them, else pytorch `.bin`; never both. A repo of GGUF
files (llama.cpp's downloads) is named `REPO:TAG`, as llama.cpp's `-hf` and Ollama name them
(`unsloth/DeepSeek-V3-GGUF:UD-IQ1_S`): the parts of the one GGUF model whose path holds TAG as a
word are fetched (a repo with one GGUF model needs no TAG; vision projectors are left out). The
revision is pinned to the commit the hub reports first, so every file comes from one
commit, and that commit is recorded in the manifest. Weight files download in parallel through
huggingface_hub (resumable, with its fast backends when installed), under one progress bar.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm.auto import tqdm

import huggingface_hub
from huggingface_hub import constants as hub_constants, errors as hub_errors

from .errors import HubUnreachableError, SourceError
from .source import GGUF_SPLIT_NAME, SIDE_FILES

PARALLEL_DOWNLOADS = 8  # weight files fetched at once (huggingface_hub's snapshot_download default)
WEIGHT_PATTERNS = {
    "safetensors": ("model.safetensors", "model.safetensors.index.json", "model-*.safetensors"),
    "bin": ("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"),
}


TAGGED = re.compile(r"^(?P<repo>[^:]+):(?P<tag>[\w.-]+)$")  # REPO:TAG, a GGUF repo's quantization


def split_tag(source: str) -> tuple[str, str | None]:
    """("org/repo", "Q4_K_M") for "org/repo:Q4_K_M"; (source, None) for anything else."""
    m = TAGGED.match(source)
    return (m["repo"], m["tag"]) if m else (source, None)


def looks_like_repo_id(source: str) -> bool:
    repo, _ = split_tag(source)
    return (not os.path.exists(source) and repo.count("/") <= 1 and not repo.startswith((".", "/", "~"))
            and not repo.endswith(("/", ".gguf")))


def gguf_models(repo_files: list[str]) -> dict[str, list[str]]:
    """{model: its files (a split one's parts in order)} of the GGUF files of a repo, by their path
    without the part suffix; vision projectors (`mmproj`) left out."""
    models: dict[str, list[str]] = {}
    for f in sorted(repo_files):
        if f.endswith(".gguf") and "mmproj" not in f.rsplit("/", 1)[-1].lower():
            part = GGUF_SPLIT_NAME.match(f)
            models.setdefault(part["stem"] if part else f.removesuffix(".gguf"), []).append(f)
    return models


def select_gguf(repo_id: str, repo_files: list[str], tag: str | None) -> list[str]:
    """The files of the one GGUF model of the repo that `tag` names (a word of its path, any case),
    or its only one; else one line naming what there is."""
    models = gguf_models(repo_files)
    word = re.compile(rf"(^|[-_./]){re.escape(tag)}($|[-_./])", re.IGNORECASE) if tag else None
    chosen = [m for m in models if word is None or word.search(m)]
    if len(chosen) == 1:
        return models[chosen[0]]
    if not models:
        raise SourceError(f"{repo_id} has no .gguf files (asked for {repo_id}:{tag})")
    listed = ", ".join(m.rsplit("/", 1)[-1] for m in models)
    if not chosen:
        raise SourceError(f"{repo_id} has no GGUF file tagged {tag!r}; it has: {listed}")
    raise SourceError(f"{repo_id} holds {len(chosen)} GGUF models{f' tagged {tag!r}' if tag else ''}: {listed}; "
                      f"name one as {repo_id}:TAG (e.g. {repo_id}:Q4_K_M)")


def fetch_gguf(source: str, *, revision: str | None = None, token: str | None = None, progress: bool = True,
               before=lambda nbytes: None) -> tuple[Path, dict]:
    """Download the GGUF model `source` ("REPO:TAG", or a repo with one) names, resuming what an
    earlier run fetched, after `before(bytes not yet in the hub cache)` (a disk check) returns;
    (its first file, the manifest's source info)."""
    repo_id, tag = split_tag(source)
    info = repo_info(repo_id, revision=revision, token=token, files_metadata=True)
    files = select_gguf(repo_id, [s.rfilename for s in info.siblings or []], tag)
    sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
    before(sum(sizes[f] for f in files
               if not isinstance(huggingface_hub.try_to_load_from_cache(repo_id, f, revision=info.sha), str)))
    with tqdm(total=0, unit="B", unit_scale=True, desc="download", file=sys.stderr, disable=not progress) as bar:
        into_bar = _into(bar)
        with ThreadPoolExecutor(PARALLEL_DOWNLOADS, thread_name_prefix="reshard-download") as pool:
            paths = list(pool.map(lambda f: download(repo_id, f, commit=info.sha, token=token, tqdm_class=into_bar),
                                  files))
    return paths[0], {"id": source, "revision": revision, "commit": info.sha}


def select_files(repo_files: list[str]) -> list[str]:
    """The files of a repo that a conversion needs (top level only)."""
    top = [f for f in repo_files if "/" not in f]
    for kind in ("safetensors", "bin"):
        weights = [f for f in top if any(fnmatch.fnmatch(f, p) for p in WEIGHT_PATTERNS[kind])]
        if weights:
            return [f for f in top if f in SIDE_FILES] + sorted(weights)
    raise SourceError("the repo has no model.safetensors or pytorch_model.bin weights at its top level")


def repo_info(repo_id: str, *, revision: str | None = None, token: str | None = None, files_metadata: bool = False):
    """`huggingface_hub.model_info`, its errors turned into `SourceError`s that say what to do."""
    token = token or os.environ.get("HF_TOKEN") or None
    try:
        return huggingface_hub.model_info(repo_id, revision=revision, token=token, files_metadata=files_metadata)
    except Exception as e:
        error = hub_error(e, repo_id, revision=revision)
        if error is None:
            raise
        raise error from None


def download(repo_id: str, filename: str, *, commit: str, token: str | None = None, local_dir: Path | None = None,
             tqdm_class=None) -> Path:
    """One file (resumed if an earlier run left part of it), through huggingface_hub's fastest
    installed transfer backend (hf_xet, hf_transfer); `tqdm_class` receives its progress."""
    token = token or os.environ.get("HF_TOKEN") or None
    kwargs = {"tqdm_class": tqdm_class} if tqdm_class is not None else {}
    try:
        return Path(huggingface_hub.hf_hub_download(
            repo_id, filename, revision=commit, token=token, local_dir=local_dir, **kwargs))
    except Exception as e:
        if getattr(e, "errno", None) == errno.ENOSPC:
            raise  # the CLI says: no space left, free some and rerun
        error = hub_error(e, repo_id, revision=commit, filename=filename)
        if error is None:
            raise
        raise error from None


def endpoint() -> str:
    """The hub's address as huggingface_hub uses it, marked when it comes from HF_ENDPOINT."""
    url = hub_constants.ENDPOINT
    return f"{url} (HF_ENDPOINT)" if os.environ.get("HF_ENDPOINT") else url


def hub_error(e: BaseException, repo_id: str, *, revision: str | None = None,
              filename: str | None = None) -> SourceError | None:
    """One `SourceError` for what went wrong asking the hub for `repo_id`; None if `e` is not the hub's."""
    what = f"{filename} from {repo_id}" if filename else repo_id
    where, url = endpoint(), f"{hub_constants.ENDPOINT}/{repo_id}"
    if isinstance(e, hub_errors.GatedRepoError):
        return SourceError(f"{repo_id} is gated: accept its terms at {url}, then set HF_TOKEN or pass token=...",
                           cli=f"{repo_id} is gated: accept its terms at {url}, then pass --token or set HF_TOKEN")
    if isinstance(e, hub_errors.RepositoryNotFoundError):
        text = f"{repo_id} is neither a local path nor a repo on {where} that you can see (check the name; "
        return SourceError(text + "a private repo needs HF_TOKEN or token=...)",
                           cli=text + "a private repo needs --token or HF_TOKEN)")
    if isinstance(e, hub_errors.RevisionNotFoundError):
        text = f"{repo_id} on {where} has no revision {revision!r}; pass an existing branch, tag or commit"
        return SourceError(text + " as revision=...", cli=text + " to --revision")
    chain = list(_chain(e))
    if any(isinstance(c, hub_errors.OfflineModeIsEnabled) for c in chain):
        return HubUnreachableError(f"cannot fetch {what}: HF_HUB_OFFLINE is set; unset it to download, "
                           f"or use a local folder or .gguf file")
    network = [c for c in chain if any(k.__name__ in NETWORK_ERRORS for k in type(c).__mro__)]
    if network:
        check = "the network and HF_ENDPOINT" if os.environ.get("HF_ENDPOINT") else "the network"
        fix = "then run the same command again to resume" if filename else "or use a local folder or .gguf file"
        return HubUnreachableError(f"cannot reach the hub at {where} to fetch {what} ({_first_line(network[0])}); "
                           f"check {check}, {fix}")
    http = [c for c in chain if isinstance(c, hub_errors.HfHubHTTPError)]
    if http:
        status = getattr(getattr(http[0], "response", None), "status_code", None) or _first_line(http[0])
        return SourceError(f"the hub at {where} answered HTTP {status} for {what}; "
                           f"run the same command again later, or check the name and HF_TOKEN")
    return None


# Connection failures, by class name: huggingface_hub raises its HTTP library's own (httpx's
# TransportError family; requests' ConnectionError and Timeout in older versions).
NETWORK_ERRORS = {"TransportError", "ConnectionError", "Timeout", "TimeoutException", "TimeoutError"}


def _chain(e: BaseException | None, depth: int = 8):
    """`e` and the exceptions behind it (hf_hub_download wraps connection errors in its own)."""
    while e is not None and depth > 0:
        yield e
        e, depth = e.__cause__ or e.__context__, depth - 1


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


class HubCheckpoint:
    """A hub repo at one commit: its config and tokenizer are fetched at once, its weights only
    by `open()`, so a conversion can check OUT and the disks before the large download."""

    def __init__(self, repo_id: str, *, revision: str | None = None, token: str | None = None):
        info = repo_info(repo_id, revision=revision, token=token, files_metadata=True)
        names = [s.rfilename for s in info.siblings or []]
        # a repo of GGUF files alone (llama.cpp's downloads): opening.open_source fetches one GGUF model
        self.gguf_only = bool(gguf_models(names)) and not any(
            fnmatch.fnmatch(f, p) for f in names if "/" not in f for ps in WEIGHT_PATTERNS.values() for p in ps)
        if self.gguf_only:
            return
        files = select_files(names)
        if "config.json" not in files:
            raise SourceError(f"{repo_id} has no config.json at its top level; it is not a transformers checkpoint")
        self.repo_id, self.token = repo_id, token
        self.info = {"id": repo_id, "revision": revision, "commit": info.sha}
        self.sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
        self.weights = [f for f in files if f not in SIDE_FILES]
        side = [self._download(f) for f in files if f in SIDE_FILES]
        self.folder = side[0].parent

    @property
    def cache_dir(self) -> Path:
        """Where the weights are downloaded to (huggingface_hub's cache)."""
        return Path(hub_constants.HF_HUB_CACHE)

    def download_bytes(self) -> int:
        """Bytes of the weight files not yet in the hub cache."""
        cached = [huggingface_hub.try_to_load_from_cache(self.repo_id, f, revision=self.info["commit"])
                  for f in self.weights]
        return sum(self.sizes.get(f, 0) for f, c in zip(self.weights, cached) if not isinstance(c, str))

    def open(self, *, progress: bool = True) -> Path:
        """Download the weights, several files at once (resuming what an earlier run fetched),
        with one progress bar on stderr over all their bytes; the snapshot folder."""
        with tqdm(total=0, unit="B", unit_scale=True, desc="download", file=sys.stderr, disable=not progress) as bar:
            into_bar = _into(bar)
            with ThreadPoolExecutor(PARALLEL_DOWNLOADS, thread_name_prefix="reshard-download") as pool:
                list(pool.map(lambda f: self._download(f, tqdm_class=into_bar), self.weights))
        return self.folder

    def _download(self, filename: str, tqdm_class=None) -> Path:
        return download(self.repo_id, filename, commit=self.info["commit"], token=self.token, tqdm_class=tqdm_class)


def _into(bar):
    """A tqdm class for huggingface_hub whose bars all add into `bar`: one bar for many files."""
    lock = threading.Lock()

    class Into:
        def __init__(self, *args, total=None, initial=0, **kwargs):
            with lock:
                bar.total = (bar.total or 0) + (total or 0)
                bar.update(initial or 0)

        def update(self, n=1):
            with lock:
                bar.update(n or 0)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def close(self):
            pass

        def update_transfer(self, n=1):  # hf_xet's bytes on the wire; `update` counts the file's
            pass

        def set_postfix_str(self, *args, **kwargs):
            pass

        set_transfer_postfix_str = set_postfix_str

    return Into
