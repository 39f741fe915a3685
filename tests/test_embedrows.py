"""Streamed input embeddings bring only the rows a call looks up (runtime/embedrows.py): the same
logits as the whole matrix, a decode pass reads one row, and tied or resident embeddings, or a
group holding more than the embedding weight, load as before."""

from __future__ import annotations

import pytest
import torch

from reshard.format import read_manifest
from runtime import LayeredModel, embedrows

IDS = torch.tensor([[5, 17, 42, 17, 9]])


def generate(model):
    out = model.generate(IDS, max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.logits)


@pytest.mark.parametrize("arch", ["qwen2", "phi3"])
def test_streamed_rows_give_the_whole_lookup_bits_and_read_a_row_per_token(arch, tiny_converted):
    folder = tiny_converted[arch]
    manifest = read_manifest(folder)
    embed = next(i for i, g in enumerate(manifest.groups) if g.kind == "pre")
    with LayeredModel.from_pretrained(folder, device="cpu", max_cpu_memory="64GiB") as resident:
        assert embedrows.find(resident.model, resident.loader) is None  # resident: looked up in place
        want = generate(resident)
    with LayeredModel.from_pretrained(folder, device="cpu", max_cpu_memory=0) as streamed:
        assert embedrows.find(streamed.model, streamed.loader) == (embed, "model.embed_tokens.weight")
        got = generate(streamed)
        decode = streamed.stats.per_pass[-1]
        weight = manifest.groups[embed].tensors["model.embed_tokens.weight"]
        row = weight["shape"][1] * 4  # one float32 row
        others = sum(g.bytes for j, g in enumerate(manifest.groups) if j != embed and g.file)
        assert decode.bytes == others + row  # the one token's row, not the 320-row matrix
        assert streamed.model.get_input_embeddings().weight.device.type == "meta"  # nothing kept between calls
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_an_id_outside_the_vocabulary_still_fails(tiny_converted):
    with LayeredModel.from_pretrained(tiny_converted["qwen2"], device="cpu", max_cpu_memory=0) as streamed:
        with pytest.raises((IndexError, RuntimeError)):
            streamed(torch.tensor([[5, 100000]]))


@pytest.mark.parametrize("arch", ["llama", "gemma", "gpt2"])
def test_tied_or_shared_embedding_groups_load_whole(arch, tiny_converted):
    """llama and gemma tie the head to the embeddings (the head needs the whole matrix); gpt2's
    first group holds the position embeddings too."""
    with LayeredModel.from_pretrained(tiny_converted[arch], device="cpu", max_cpu_memory=0) as streamed:
        assert embedrows.find(streamed.model, streamed.loader) is None
