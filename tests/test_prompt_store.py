"""Prompt store: encode with the model's own text encoder, read back, validate, distributed sampler."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from videoblade.data import (
    DEFAULT_TRAIN_PROMPTS,
    DEFAULT_VAL_PROMPTS,
    DistributedPromptSampler,
    PromptStore,
    PromptStoreError,
    encode_prompts_to_store,
    read_prompt_file,
    write_prompt_store,
)
from videoblade.models import get_adapter
from videoblade.models.tiny import tiny_model_folder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_wan():
    return tiny_model_folder("wan")


def test_default_prompt_lists():
    train, val = read_prompt_file(DEFAULT_TRAIN_PROMPTS), read_prompt_file(DEFAULT_VAL_PROMPTS)
    assert len(train) >= 200 and len(val) >= 8
    assert len(set(train)) == len(train)
    assert not set(train) & set(val)


def test_encode_store_matches_adapter_encoding(tiny_wan, tmp_path):
    prompts = [f"a small red robot walks in the city number {i}" for i in range(7)] + ["sunset over the sea"]
    out = encode_prompts_to_store(tiny_wan, prompts, tmp_path / "store", dtype="fp32", batch_size=3, shard_size=3,
                                  negative_prompt="blurry", progress=False)
    store = PromptStore(out)
    m = json.loads((out / "manifest.json").read_text())
    assert m["family"] == "wan" and m["count"] == 8 and [s["count"] for s in m["shards"]] == [3, 3, 2]
    assert store.prompts() == prompts and m["negative_prompt"] == "blurry"
    adapter = get_adapter("wan")
    loaded = adapter.load(tiny_wan, dtype=torch.float32, components=("text_encoder", "tokenizer"))
    ref = adapter.encode_prompts(loaded.text_encoder, loaded.tokenizer, prompts, max_length=store.text_max_length)
    torch.testing.assert_close(store.get(range(8)), ref.float())
    torch.testing.assert_close(store.get([7, 2, 4]), ref[[7, 2, 4]].float())
    neg = adapter.encode_prompts(loaded.text_encoder, loaded.tokenizer, ["blurry"], max_length=store.text_max_length)
    torch.testing.assert_close(store.negative(), neg.float())
    store.check("wan", store.text_max_length, store.hidden_size)
    with pytest.raises(PromptStoreError, match="encoded for a wan model"):
        store.check("cogvideox")
    with pytest.raises(PromptStoreError, match="text_max_length"):
        store.check("wan", store.text_max_length + 1)
    with pytest.raises(IndexError):
        store.get([8])


def test_process_prompts_cli(tiny_wan, tmp_path):
    pf = tmp_path / "p.txt"
    pf.write_text("# comment\na cat on a sofa\n\na dog in the snow\n")
    out = tmp_path / "store"
    r = subprocess.run([sys.executable, str(ROOT / "utils" / "process_prompts.py"), "--model", str(tiny_wan),
                        "--prompts", str(pf), "--out", str(out), "--device", "cpu"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    s = PromptStore(out)
    assert len(s) == 2 and s.prompts() == ["a cat on a sofa", "a dog in the snow"]
    assert s.dtype == torch.bfloat16 and s.get([0]).dtype == torch.bfloat16


def test_store_errors(tmp_path):
    with pytest.raises(PromptStoreError, match="process_prompts"):
        PromptStore(tmp_path)
    with pytest.raises(PromptStoreError, match="prompts"):
        write_prompt_store(tmp_path / "s", [torch.zeros(2, 4, 8)], ["a"], family="wan", text_max_length=4,
                           negative_embeds=torch.zeros(1, 4, 8))
    write_prompt_store(tmp_path / "s", [torch.zeros(2, 4, 8)], ["a", "b"], family="wan", text_max_length=4,
                       negative_embeds=torch.zeros(1, 4, 8))
    (tmp_path / "s" / "embeds-00000.safetensors").unlink()
    with pytest.raises(PromptStoreError, match="missing"):
        PromptStore(tmp_path / "s")


@pytest.mark.parametrize("n,world,batch", [(10, 2, 2), (7, 3, 1), (5, 1, 5), (13, 2, 3)])
def test_sampler_every_prompt_once_per_epoch(n, world, batch):
    samplers = [DistributedPromptSampler(n, batch, world, r, seed=3) for r in range(world)]
    steps = 6 * n  # plenty of epochs
    stream = []
    for _ in range(steps):
        for s in samplers:
            stream.append(s.next_indices())
    # reassemble the global stream: at each step ranks interleave
    flat = []
    for i in range(0, len(stream), world):
        group = stream[i:i + world]
        for j in range(batch):
            for r in range(world):
                flat.append(group[r][j])
    for e in range(len(flat) // n):
        assert sorted(flat[e * n:(e + 1) * n]) == list(range(n))
    assert flat[:n] != flat[n:2 * n] or n < 3  # a fresh permutation per epoch


def test_sampler_resume_is_exact():
    a = DistributedPromptSampler(11, 2, 2, 1, seed=5)
    first = [a.next_indices() for _ in range(4)]
    state = a.state_dict()
    rest = [a.next_indices() for _ in range(9)]
    b = DistributedPromptSampler(11, 2, 2, 1, seed=5)
    b.load_state_dict(state)
    assert [b.next_indices() for _ in range(9)] == rest
    c = DistributedPromptSampler(11, 2, 2, 1, seed=5)
    assert [c.next_indices() for _ in range(4)] == first
    with pytest.raises(PromptStoreError, match="same prompt store"):
        DistributedPromptSampler(12, 2, 2, 1).load_state_dict(state)


def test_sampler_resume_refuses_another_seed():
    state = DistributedPromptSampler(11, 2, 1, 0, seed=5).state_dict()
    with pytest.raises(PromptStoreError, match="same train.seed"):
        DistributedPromptSampler(11, 2, 1, 0, seed=6).load_state_dict(state)


def test_neighbouring_seeds_draw_unrelated_orders():
    # epoch e was seeded with seed + e: seed 1's first epoch was seed 0's second, so seed ablations
    # (seeds 0, 1, 2) trained on one prompt order shifted by an epoch
    n = 50

    def epochs(seed, k):
        s = DistributedPromptSampler(n, n, 1, 0, seed=seed)
        return [s.next_indices() for _ in range(k)]

    a, b = epochs(0, 3), epochs(1, 3)
    assert all(x != y for x in a for y in b)
    assert sorted(a[0]) == list(range(n)) and a[0] != a[1]


def test_resume_of_a_checkpoint_without_order_keeps_its_legacy_order():
    # a checkpoint written before the sampler recorded its order continues the order it started with
    n = 7
    state = {"position": 9, "seed": 4, "num_prompts": n, "batch_size": 3, "num_replicas": 1}
    s = DistributedPromptSampler(n, 3, 1, 0, seed=4)
    s.load_state_dict(state)
    legacy = torch.randperm(n, generator=torch.Generator().manual_seed(4 + 1)).tolist()
    assert s.next_indices() == legacy[2:5]
    assert s.state_dict()["order"] == "seed+epoch"
    with pytest.raises(PromptStoreError, match="unknown"):
        DistributedPromptSampler(n, 3, 1, 0, seed=4).load_state_dict(dict(state, order="other"))


def test_multi_shard_store_reads_rows_and_replaces_safely(tmp_path, monkeypatch):
    # rows come from the right shards in the requested order; re-writing a store puts the new one in
    # place before the old is deleted, and a failed write leaves the old store and no temporary folder
    emb = torch.arange(7 * 2 * 3, dtype=torch.float32).reshape(7, 2, 3)
    kw = dict(family="wan", text_max_length=2, negative_embeds=torch.zeros(1, 2, 3), dtype="fp32", shard_size=3)
    write_prompt_store(tmp_path / "s", [emb[:4], emb[4:]], [f"p{i}" for i in range(7)], **kw)
    st = PromptStore(tmp_path / "s")
    assert len(st.manifest["shards"]) == 3
    idx = [6, 0, 3, 2, 5, 3]
    assert torch.equal(st.get(idx), emb[idx])

    def broken():
        yield emb[:2]
        raise RuntimeError("encoder died")

    with pytest.raises(RuntimeError, match="encoder died"):
        write_prompt_store(tmp_path / "s", broken(), ["x"] * 2, **kw)
    assert torch.equal(PromptStore(tmp_path / "s").get([1]), emb[[1]])  # the old store is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    write_prompt_store(tmp_path / "s", [emb[:2]], ["a", "b"], **kw)
    assert len(PromptStore(tmp_path / "s")) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    with pytest.raises(PromptStoreError, match="embeddings must be"):  # hidden size changes between batches
        write_prompt_store(tmp_path / "t", [emb[:2], torch.zeros(1, 2, 5)], ["a", "b", "c"], **kw)


def test_store_never_overwrites_other_folders_and_reads_bom_files(tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "data.txt").write_text("keep me")
    with pytest.raises(PromptStoreError, match="not a prompt store"):
        write_prompt_store(other, [torch.zeros(1, 2, 3)], ["a"], family="wan", text_max_length=2,
                           negative_embeds=torch.zeros(1, 2, 3))
    assert (other / "data.txt").read_text() == "keep me"
    f = tmp_path / "p.txt"
    f.write_bytes("\ufeff# comment\nfirst prompt\n".encode())
    assert read_prompt_file(f) == ["first prompt"]
    f.write_bytes(b"\xff\xfe bad")
    with pytest.raises(PromptStoreError, match="not UTF-8"):
        read_prompt_file(f)


def test_encode_checks_settings_before_loading(tiny_wan, tmp_path, monkeypatch):
    import diffusers
    import transformers

    def forbid(*a, **k):
        raise AssertionError("the text encoder was loaded before the request was checked")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(forbid))
    monkeypatch.setattr(diffusers.ModelMixin, "from_pretrained", classmethod(forbid))
    for kw, msg in ((dict(dtype="float16"), "dtype must be"), (dict(text_max_length=0), ">= 1"),
                    (dict(device="tpu"), "not available")):
        with pytest.raises(PromptStoreError, match=msg):
            encode_prompts_to_store(tiny_wan, ["a"], tmp_path / "s", progress=False, **kw)
    with pytest.raises(PromptStoreError, match="CogVideoX takes exactly"):
        encode_prompts_to_store(tiny_model_folder("cogvideox"), ["a"], tmp_path / "c", text_max_length=7,
                                progress=False)


def test_prompt_file_splits_on_line_ends_only(tmp_path):
    """One prompt per line means per newline (LF, CRLF or CR): characters that str.splitlines also
    breaks on (U+2028 line separator, U+0085 NEL, form feed, U+001C..U+001E) stay inside the prompt
    instead of silently cutting it in two; the store's prompts.txt reads back in store order."""
    f = tmp_path / "p.txt"
    f.write_bytes("a cat\u2028on a mat\r\nfoo\x0cbar\rbaz\x85qux \x1c end\nlast\n".encode())
    prompts = read_prompt_file(f)
    assert prompts == ["a cat\u2028on a mat", "foo\x0cbar", "baz\x85qux \x1c end", "last"]
    write_prompt_store(tmp_path / "s", [torch.zeros(4, 2, 3)], prompts, family="wan", text_max_length=2,
                       negative_embeds=torch.zeros(1, 2, 3))
    store = PromptStore(tmp_path / "s")
    assert len(store.prompts()) == len(store) == 4 and store.prompts()[3] == "last"


def test_store_folder_is_readable_by_others_as_the_umask_allows(tmp_path):
    """A store built on a shared machine gets the usual permissions of a new folder (0o777 & ~umask),
    not the owner-only 0o700 of the temporary folder it was written in: another user's training job
    can read it."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        write_prompt_store(tmp_path / "s", [torch.zeros(1, 2, 3)], ["a"], family="wan", text_max_length=2,
                           negative_embeds=torch.zeros(1, 2, 3))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "s").stat().st_mode) == 0o755
    for p in (tmp_path / "s").iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p.name


def test_write_refuses_a_shard_size_below_one(tmp_path, monkeypatch):
    """shard_size 0 would write empty shards forever (write_prompt_store is public: encode checks it,
    direct callers did not)."""
    import videoblade.data.prompt_store as ps

    calls = []
    real = ps.save_file

    def bounded(*a, **k):  # without the check the loop below never ends: stop it
        calls.append(1)
        if len(calls) > 20:
            raise RuntimeError("endless shards")
        return real(*a, **k)

    monkeypatch.setattr(ps, "save_file", bounded)
    with pytest.raises(PromptStoreError, match="shard_size"):
        write_prompt_store(tmp_path / "s", [torch.zeros(2, 2, 3)], ["a", "b"], family="wan", text_max_length=2,
                           negative_embeds=torch.zeros(1, 2, 3), shard_size=0)
    assert not (tmp_path / "s").exists()


def test_text_encoder_never_computes_in_fp16():
    # an fp16 store was encoded by a T5 running in fp16, which overflows (inf/NaN embeddings); the
    # store keeps its dtype, the encoder computes in bf16 (float32 on the CPU)
    from videoblade.data.encode import encoder_dtype

    assert encoder_dtype("fp16", "cuda") == torch.bfloat16
    assert encoder_dtype("bf16", "cuda:0") == torch.bfloat16
    assert encoder_dtype("fp32", "cuda") == torch.float32
    assert {encoder_dtype(d, "cpu") for d in ("fp16", "bf16", "fp32")} == {torch.float32}
