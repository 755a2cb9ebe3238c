"""Prompt-embedding store: the only "data" TDM distillation needs (SPEC section 2: data-free).

Layout of a store folder (written by `utils/process_prompts.py` / `encode_prompt_file`):

    manifest.json            {"format": "videoblade-prompt-store", "version": 1, "family", "model_path",
                              "text_max_length", "hidden_size", "dtype", "count", "shards": [{"file", "count"}],
                              "negative_prompt", "negative_file", "prompts_file"}
    embeds-00000.safetensors "embeds": [n, text_max_length, hidden_size] (the text encoder's output,
                             exactly as the family's diffusers pipeline computes it)
    negative.safetensors     "embeds": [1, text_max_length, hidden_size] (the teacher's CFG negative prompt)
    prompts.txt              the prompts, one per line, in store order

`PromptStore(path)` reads it lazily (one shard open at a time); `check(family, text_max_length)`
validates it against a model before any weights load. `DistributedPromptSampler` hands every rank
its slice of a deterministic stream of per-epoch permutations: every prompt is used once per epoch
across all ranks, and the position (an integer) is all that a checkpoint needs to resume.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = [
    "PromptStoreError",
    "PromptStore",
    "write_prompt_store",
    "DistributedPromptSampler",
    "read_prompt_file",
    "MANIFEST",
]

MANIFEST = "manifest.json"
FORMAT = "videoblade-prompt-store"
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
STORE_DTYPES = tuple(_DTYPES)  # the dtypes a store holds (process_prompts --dtype)


class PromptStoreError(ValueError):
    """The prompt store is missing, malformed or does not match the model; the message says what to do."""


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts from a text file: one per line; blank lines and lines starting with '#' are skipped."""
    p = Path(path)
    if not p.is_file():
        raise PromptStoreError(f"prompt file {p} not found")
    try:  # utf-8-sig: a byte-order mark (Windows editors) would otherwise join the first line
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise PromptStoreError(f"prompt file {p} is not UTF-8 text ({e}): save it as UTF-8") from None
    # read_text already turned CRLF / CR into "\n"; str.splitlines would also cut a prompt at U+2028,
    # U+0085, form feeds and U+001C..U+001E, which no editor shows as a line end
    out = [ln.strip() for ln in text.split("\n")]
    out = [ln for ln in out if ln and not ln.startswith("#")]
    if not out:
        raise PromptStoreError(f"prompt file {p} holds no prompts (one per line)")
    return out


def write_prompt_store(out_dir: str | Path, batches: Iterable[torch.Tensor], prompts: list[str], *, family: str,
                       text_max_length: int, negative_embeds: torch.Tensor, negative_prompt: str = "",
                       dtype: str = "bf16", shard_size: int = 1024, model_path: str | None = None) -> Path:
    """Write embeddings (an iterable of [b, T, C] tensors, in prompt order) as a store, atomically."""
    if dtype not in _DTYPES:
        raise PromptStoreError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if int(shard_size) < 1:
        raise PromptStoreError(f"shard_size must be >= 1, got {shard_size}")
    out_dir = Path(out_dir)
    check_store_target(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.writing-", dir=out_dir.parent))
    try:
        _write_store_files(tmp, batches, prompts, family=family, text_max_length=text_max_length,
                           negative_embeds=negative_embeds, negative_prompt=negative_prompt, dtype=dtype,
                           shard_size=shard_size, model_path=model_path)
        # mkdtemp makes the folder owner-only (0o700) and safetensors writes owner-only files (0o600):
        # give them a new folder's / file's usual mode, so another user's job on a shared machine can
        # read the store
        umask = os.umask(0)
        os.umask(umask)
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        os.chmod(tmp, 0o777 & ~umask)
        # the new store goes in place before the old one is deleted: a kill at any point leaves a
        # complete store at out_dir, or the old one beside it
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "s")
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


def check_store_target(out_dir: Path) -> None:
    """Refuse to write a store over anything but an empty folder or an earlier store."""
    if out_dir.exists() and not out_dir.is_dir():
        raise PromptStoreError(f"{out_dir} exists and is not a folder: choose another output path")
    if out_dir.is_dir() and not (out_dir / MANIFEST).is_file() and any(out_dir.iterdir()):
        raise PromptStoreError(f"{out_dir} exists and is not a prompt store: choose an empty or new folder")


def _write_store_files(tmp: Path, batches, prompts, *, family, text_max_length, negative_embeds, negative_prompt,
                       dtype, shard_size, model_path) -> None:
    td = _DTYPES[dtype]
    shards, pending, count, hidden = [], [], 0, None

    def flush(final: bool = False):
        nonlocal pending
        while pending and (final or sum(x.shape[0] for x in pending) >= shard_size):
            cat = torch.cat(pending, 0)
            take, rest = cat[:shard_size], cat[shard_size:]
            name = f"embeds-{len(shards):05d}.safetensors"
            save_file({"embeds": take.contiguous()}, str(tmp / name))
            shards.append({"file": name, "count": int(take.shape[0])})
            pending = [rest] if rest.shape[0] else []

    for emb in batches:
        if emb.ndim != 3 or emb.shape[1] != text_max_length or (hidden is not None and emb.shape[2] != hidden):
            raise PromptStoreError(f"embeddings must be [b, {text_max_length}, {hidden or 'C'}], got {tuple(emb.shape)}")
        hidden = hidden or int(emb.shape[2])
        pending.append(emb.detach().to("cpu", td))
        count += emb.shape[0]
        flush()
    flush(final=True)
    if count != len(prompts):
        raise PromptStoreError(f"{count} embeddings for {len(prompts)} prompts")
    neg = negative_embeds.detach().to("cpu", td)
    if neg.ndim == 2:
        neg = neg[None]
    if tuple(neg.shape) != (1, text_max_length, hidden):
        raise PromptStoreError(f"negative embedding must be [1, {text_max_length}, {hidden}], got {tuple(neg.shape)}")
    save_file({"embeds": neg.contiguous()}, str(tmp / "negative.safetensors"))
    # one prompt per line: a line end inside a prompt becomes a space (`prompts()` splits on "\n" only)
    lines = (p.replace("\r\n", " ").replace("\r", " ").replace("\n", " ") for p in prompts)
    (tmp / "prompts.txt").write_text("\n".join(lines) + "\n", encoding="utf-8", newline="\n")
    manifest = {"format": FORMAT, "version": 1, "family": family, "model_path": model_path,
                "text_max_length": int(text_max_length), "hidden_size": hidden, "dtype": dtype, "count": count,
                "shards": shards, "negative_prompt": negative_prompt, "negative_file": "negative.safetensors",
                "prompts_file": "prompts.txt"}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))


class PromptStore:
    """Read-only access to a prompt store folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        mf = self.path / MANIFEST
        if not mf.is_file():
            raise PromptStoreError(
                f"{self.path} is not a prompt store (no {MANIFEST}): build one with "
                f"`python utils/process_prompts.py --model <model folder> --prompts <file> --out {self.path}`"
            )
        try:
            m = json.loads(mf.read_text())
        except json.JSONDecodeError as e:
            raise PromptStoreError(f"{mf} is not valid JSON ({e}): rebuild the store") from None
        if m.get("format") != FORMAT:
            raise PromptStoreError(f"{mf} is not a {FORMAT} manifest")
        self.manifest = m
        self.family: str = m["family"]
        self.text_max_length: int = int(m["text_max_length"])
        self.hidden_size: int = int(m["hidden_size"])
        if m.get("dtype") not in _DTYPES:
            raise PromptStoreError(f"{mf}: dtype {m.get('dtype')!r} is not one of {sorted(_DTYPES)}: rebuild the store")
        self.dtype: torch.dtype = _DTYPES[m["dtype"]]
        self.count: int = int(m["count"])
        # the text the negative embedding was encoded from (the trainer checks it against tdm.negative_prompt);
        # None: a store whose manifest does not record it
        neg = m.get("negative_prompt")
        self.negative_prompt: str | None = neg if isinstance(neg, str) else None
        self._starts, s = [], 0
        for sh in m["shards"]:
            if not (self.path / sh["file"]).is_file():
                raise PromptStoreError(f"shard {self.path / sh['file']} listed in the manifest is missing")
            self._starts.append(s)
            s += int(sh["count"])
        if s != self.count:
            raise PromptStoreError(f"{mf}: shards hold {s} prompts but count says {self.count}")
        if not (self.path / m["negative_file"]).is_file():
            raise PromptStoreError(f"{self.path / m['negative_file']} (the negative embedding) is missing")

    def __len__(self) -> int:
        return self.count

    def check(self, family: str, text_max_length: int | None = None, hidden_size: int | None = None) -> None:
        """Raise PromptStoreError unless the store was encoded for this model family and length."""
        fam = family.replace("tiny-", "")
        if self.family.replace("tiny-", "") != fam:
            raise PromptStoreError(
                f"prompt store {self.path} was encoded for a {self.family} model, but the model is {fam}: "
                "re-encode the prompts with this model's text encoder (utils/process_prompts.py)"
            )
        if text_max_length is not None and int(text_max_length) != self.text_max_length:
            raise PromptStoreError(
                f"prompt store {self.path} has text_max_length {self.text_max_length}, the run expects "
                f"{text_max_length}: set model.text_max_length={self.text_max_length} or re-encode"
            )
        if hidden_size is not None and int(hidden_size) != self.hidden_size:
            raise PromptStoreError(
                f"prompt store {self.path} holds {self.hidden_size}-dim embeddings, the transformer takes "
                f"{hidden_size}: it was encoded with another text encoder; re-encode with this model folder"
            )

    def get(self, indices: Iterable[int]) -> torch.Tensor:
        """Embeddings [len(indices), T, C] in the store dtype. Reads only the requested rows (a Wan
        shard of 1024 prompts is 4 GiB; the sampler's random order would otherwise reload a whole
        shard for nearly every index)."""
        indices = [int(i) for i in indices]
        for idx in indices:
            if not 0 <= idx < self.count:
                raise IndexError(f"prompt index {idx} out of range [0, {self.count})")
        rows: dict[int, torch.Tensor] = {}
        by_shard: dict[int, list[int]] = {}
        for idx in indices:
            by_shard.setdefault(bisect.bisect_right(self._starts, idx) - 1, []).append(idx)
        for shard, idxs in by_shard.items():
            with safe_open(str(self.path / self.manifest["shards"][shard]["file"]), framework="pt") as f:
                sl = f.get_slice("embeds")
                for idx in idxs:
                    r = idx - self._starts[shard]
                    rows[idx] = sl[r : r + 1][0]
        return torch.stack([rows[i] for i in indices], 0)

    def negative(self) -> torch.Tensor:
        with safe_open(str(self.path / self.manifest["negative_file"]), framework="pt") as f:
            return f.get_tensor("embeds")

    def prompts(self) -> list[str]:
        p = self.path / self.manifest.get("prompts_file", "prompts.txt")
        if not p.is_file():
            return []
        text = p.read_text(encoding="utf-8")
        return text.removesuffix("\n").split("\n") if text else []  # one prompt per "\n"-ended line


ORDER = "blake2b"  # epoch e's permutation seeded with blake2b(f"{seed}/{e}")
LEGACY_ORDER = "seed+epoch"  # checkpoints written before the order was recorded


def _epoch_seed(seed: int, epoch: int, order: str = ORDER) -> int:
    if order == LEGACY_ORDER:
        return seed + epoch
    return int.from_bytes(hashlib.blake2b(f"{seed}/{epoch}".encode(), digest_size=8).digest(), "little")


class DistributedPromptSampler:
    """Deterministic, resumable batches of prompt indices for one rank.

    The stream is the concatenation of per-epoch permutations of range(n) (epoch e uses a
    torch.Generator seeded with a hash of (seed, e), so runs with neighbouring seeds draw unrelated
    orders; seed + e, the order of checkpoints that do not record ``order``, made seed s + 1 replay
    seed s one epoch later). Step s consumes stream items
    [s*W*B, (s+1)*W*B) (W ranks, B per rank); rank r takes items r, r+W, r+2W, ... of them. So
    every prompt appears exactly once per epoch across the ranks, and `position` (items consumed)
    is the whole state.
    """

    def __init__(self, num_prompts: int, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        if num_prompts < 1:
            raise PromptStoreError("the prompt store is empty")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} not in [0, {num_replicas})")
        self.n, self.batch_size, self.world, self.rank, self.seed = num_prompts, batch_size, num_replicas, rank, seed
        self.position = 0
        self.order = ORDER  # how an epoch's generator is seeded (a resumed run keeps its checkpoint's)
        self._perm_epoch: int | None = None
        self._perm: torch.Tensor | None = None

    def _epoch_perm(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed(_epoch_seed(int(self.seed), int(epoch), self.order))
            self._perm = torch.randperm(self.n, generator=g)
            self._perm_epoch = epoch
        return self._perm

    def _item(self, pos: int) -> int:
        return int(self._epoch_perm(pos // self.n)[pos % self.n])

    @property
    def epoch(self) -> int:
        return self.position // self.n

    def next_indices(self) -> list[int]:
        """This rank's prompt indices for the next step; advances the position for all ranks alike."""
        step = self.world * self.batch_size
        base = self.position
        out = [self._item(base + self.rank + j * self.world) for j in range(self.batch_size)]
        self.position = base + step
        return out

    def state_dict(self) -> dict:
        return {"position": int(self.position), "seed": int(self.seed), "num_prompts": int(self.n),
                "batch_size": int(self.batch_size), "num_replicas": int(self.world), "order": self.order}

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("num_prompts", self.n)) != self.n:
            raise PromptStoreError(
                f"the checkpoint was taken with {state['num_prompts']} prompts, the store now holds {self.n}: "
                "resume with the same prompt store"
            )
        if int(state.get("seed", self.seed)) != int(self.seed):
            raise PromptStoreError(
                f"the checkpoint's prompt order was drawn with seed {state['seed']}, this run uses {self.seed}: "
                "resume with the same train.seed (another seed would repeat and skip prompts mid-epoch)"
            )
        order = state.get("order", LEGACY_ORDER)
        if order not in (ORDER, LEGACY_ORDER):
            raise PromptStoreError(f"the checkpoint's prompt order {order!r} is unknown to this videoblade "
                                   f"(it knows {ORDER!r} and {LEGACY_ORDER!r}): resume with the version that wrote it")
        self.order = order
        self._perm_epoch = None
        self.position = int(state["position"])
