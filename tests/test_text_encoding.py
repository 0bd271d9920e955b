"""Long captions and prompts: 75-token windows, joined as sd-scripts joins them (`max_token_length`)."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTextModel, CLIPTokenizer

from lorakit.errors import ConfigError
from lorakit.text_encoding import WINDOW, encode_windows, layer_states, token_windows, window_count

LONG = ", ".join(f"tag{i}" for i in range(16))  # 75-150 tokens with the tiny tokenizer's byte pieces


@pytest.fixture(scope="module")
def tokenizer(tiny_sd1_dir):
    return CLIPTokenizer.from_pretrained(tiny_sd1_dir / "tokenizer")


@pytest.fixture(scope="module")
def text_encoder(tiny_sd1_dir):
    return CLIPTextModel.from_pretrained(tiny_sd1_dir / "text_encoder").eval()


@pytest.mark.parametrize("pad", [None, "!"])  # SD1 pads with the end token, SD2 with "!"
def test_one_window_is_the_usual_77_token_encoding(tiny_sd1_dir, pad):
    extra = {"pad_token": pad} if pad else {}
    tok = CLIPTokenizer.from_pretrained(tiny_sd1_dir / "tokenizer", **extra)
    texts = ["a photo of sks dog", "", LONG]
    usual = tok(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(token_windows(tok, texts, WINDOW)[:, 0], usual)


def test_windows_hold_consecutive_75_token_pieces(tokenizer):
    pieces = tokenizer(LONG, add_special_tokens=False).input_ids
    assert 75 < len(pieces) < 150
    ids = token_windows(tokenizer, [LONG, "short"], 225)
    assert ids.shape == (2, 3, 77)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    first, second, third = ids[0].tolist()
    assert first == [bos, *pieces[:75], eos]  # a full window: the end token at position 76
    rest = pieces[75:]
    assert second == [bos, *rest, eos] + [eos] * (75 - len(rest))
    assert third == [bos, eos] + [eos] * 75  # an empty window: start, end, padding
    assert window_count(tokenizer, LONG) == 2 and window_count(tokenizer, "") == 1
    with pytest.raises(ConfigError, match="multiple of 75"):
        token_windows(tokenizer, [LONG], 100)


def test_windows_are_encoded_apart_and_joined_as_sd_scripts(tokenizer, text_encoder):
    ids = token_windows(tokenizer, [LONG, "a dog"], 150)
    with torch.no_grad():
        joined = encode_windows(text_encoder, ids)
        for b in range(2):  # the oracle: each window through the encoder alone, then start + 2×75 + final state
            w0 = text_encoder(ids[b, :1])[0][0]
            w1 = text_encoder(ids[b, 1:])[0][0]
            expected = torch.cat([w0[:1], w0[1:76], w1[1:76], w1[76:]])
            torch.testing.assert_close(joined[b], expected)
    assert joined.shape[1] == 152


def test_tokens_past_75_condition_the_states_only_with_longer_windows(tokenizer, text_encoder):
    texts = [LONG + ", red", LONG + ", blue"]  # the same first 75 tokens, different ends
    with torch.no_grad():
        short = encode_windows(text_encoder, token_windows(tokenizer, texts, 75))
        long = encode_windows(text_encoder, token_windows(tokenizer, texts, 150))
    torch.testing.assert_close(short[0], short[1])  # cut at 75 tokens: the tails are lost
    assert (long[0] - long[1]).abs().max() > 1e-3


def test_clip_skip_takes_an_earlier_layer_then_the_final_norm(tokenizer, text_encoder):
    ids = token_windows(tokenizer, ["a dog"], 75)[:, 0]
    with torch.no_grad():
        out = text_encoder(ids, output_hidden_states=True)
        skip = layer_states(text_encoder, ids, clip_skip=2)
        torch.testing.assert_close(skip, text_encoder.final_layer_norm(out.hidden_states[-2]))
        torch.testing.assert_close(layer_states(text_encoder, ids), out.last_hidden_state)
    with pytest.raises(ConfigError, match="clip_skip"):
        layer_states(text_encoder, ids, clip_skip=len(out.hidden_states))
