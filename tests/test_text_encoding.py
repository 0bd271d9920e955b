"""Long captions and prompts: 75-token windows, joined as sd-scripts joins them (`max_token_length`)."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTextModel, CLIPTokenizer

from lorakit.errors import ConfigError
from lorakit.text_encoding import (
    WINDOW,
    apply_emphasis,
    encode_windows,
    has_emphasis,
    layer_states,
    parse_emphasis,
    token_windows,
    weighted_token_windows,
    window_count,
    without_emphasis,
)

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


@pytest.mark.parametrize("text, runs", [  # A1111's own examples (modules/prompt_parser.py)
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.1 * 1.1 * 1.3), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)]),
    ("time: 12:30, [dim]", [("time: 12:30, ", 1.0), ("dim", 1 / 1.1)]),
])
def test_emphasis_is_parsed_as_a1111_parses_it(text, runs):
    got = parse_emphasis(text)
    assert [p for p, _ in got] == [p for p, _ in runs]
    assert [w for _, w in got] == pytest.approx([w for _, w in runs])


def test_weighted_tokens_and_states(tokenizer, text_encoder):
    ids, weights = weighted_token_windows(tokenizer, ["a (red:1.5) hat", LONG + ", [blue]"], 150)
    plain = token_windows(tokenizer, ["a red hat", LONG + ", blue"], 150)
    assert torch.equal(ids, plain)  # the brackets and numbers are not tokens
    red = len(tokenizer("red", add_special_tokens=False).input_ids)
    first = len(tokenizer("a ", add_special_tokens=False).input_ids)
    row = weights[0, 0].tolist()
    assert row[1 + first:1 + first + red] == [1.5] * red and sum(w != 1 for w in row) == red
    blue = len(tokenizer("blue", add_special_tokens=False).input_ids)
    assert (weights[1] != 1).sum() == blue and weights[1].min().item() == pytest.approx(1 / 1.1)
    with torch.no_grad():
        states = encode_windows(text_encoder, ids)
    weighted = apply_emphasis(states, weights)
    # the oracle: the joined states' positions are start, 75 per window, final; each × its token's weight
    joined = torch.cat([torch.ones(2, 1), weights[:, :, 1:-1].reshape(2, -1), torch.ones(2, 1)], dim=1)
    torch.testing.assert_close(weighted, states * joined[..., None])
    kept = apply_emphasis(states, weights, keep_mean=True)
    torch.testing.assert_close(kept.mean(dim=(1, 2)), states.mean(dim=(1, 2)))
    one = apply_emphasis(states[:, :77], weights[:, :1])  # one window: the 77 positions as they are
    torch.testing.assert_close(one, states[:, :77] * weights[:, 0, :, None])
    assert has_emphasis("a (b)") and has_emphasis(r"a \(b\)") and not has_emphasis("a b, c: d")
    assert without_emphasis(r"a ((red:1.2)) [hat] \(x\)") == "a red hat (x)"
