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
    has_break,
    has_emphasis,
    layer_states,
    parse_emphasis,
    prompt_windows,
    token_windows,
    weighted_token_windows,
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


def _tokens(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


def test_prompts_are_read_to_their_end_in_windows_of_75(tokenizer):
    # without BREAK (and without moving tags across a window's end at commas) a prompt reads as token_windows of
    # as many windows as the longest text needs
    ids, weights = prompt_windows(tokenizer, [LONG, "a photo"], comma_backtrack=0)
    assert weights is None and torch.equal(ids, token_windows(tokenizer, [LONG, "a photo"], 150))
    ids, weights = prompt_windows(tokenizer, ["a (red:1.5) hat", ""])
    wid, ww = weighted_token_windows(tokenizer, ["a (red:1.5) hat", ""], 75)
    assert torch.equal(ids, wid) and torch.equal(weights, ww)


def test_break_ends_a_window_as_a1111(tokenizer):
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.eos_token_id  # SD1 pads with </s>
    cat, dog = _tokens(tokenizer, "a cat"), _tokens(tokenizer, "a dog")
    ids, weights = prompt_windows(tokenizer, ["a cat BREAK a dog"])
    assert weights is None and ids.shape == (1, 2, 77)
    assert ids[0, 0].tolist() == [bos, *cat] + [pad] * (75 - len(cat)) + [eos]  # the rest of the window: padding
    assert ids[0, 1].tolist() == [bos, *dog, eos] + [pad] * (75 - len(dog))
    # a BREAK at the end adds nothing; at the start, or after another, it makes a window of padding
    assert torch.equal(prompt_windows(tokenizer, ["a cat BREAK"])[0], token_windows(tokenizer, ["a cat"]))
    lead = prompt_windows(tokenizer, ["BREAK a cat"])[0]
    assert lead.shape == (1, 2, 77) and lead[0, 0].tolist() == [bos] + [pad] * 75 + [eos]
    assert lead[0, 1].tolist() == token_windows(tokenizer, ["a cat"])[0, 0].tolist()
    assert prompt_windows(tokenizer, ["a cat BREAK BREAK a dog"])[0].shape == (1, 3, 77)
    # a window already full is not padded again
    full = LONG[:next(i for i in range(len(LONG)) if len(_tokens(tokenizer, LONG[:i])) == 75)]
    assert len(_tokens(tokenizer, full)) == 75
    ids = prompt_windows(tokenizer, [full + " BREAK a dog"])[0]
    assert ids.shape == (1, 2, 77) and ids[0, 1].tolist()[:len(dog) + 2] == [bos, *dog, eos]
    # a window that overflows goes on in the next one, and BREAK pads that one
    ids = prompt_windows(tokenizer, [LONG + " BREAK a dog"])[0]
    assert ids.shape == (1, 3, 77) and ids[0, 2].tolist()[:len(dog) + 2] == [bos, *dog, eos]
    # prompt and negative prompt in as many windows; only the capitalised word breaks
    assert prompt_windows(tokenizer, ["a BREAK b BREAK c", "x"])[0].shape == (2, 3, 77)
    assert prompt_windows(tokenizer, ["a break, BREAKFAST"])[0].shape == (1, 1, 77)
    assert has_break("a BREAK b") and not has_break("a break, BREAKFAST")


def test_a_full_window_ends_after_a_comma_among_its_last_20_tokens_as_a1111(tokenizer):
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.eos_token_id
    (x,), (y,), (comma,) = _tokens(tokenizer, "x"), _tokens(tokenizer, "y"), _tokens(tokenizer, ",")

    def words(word, n):
        return " ".join([word] * n)

    # 70 x, a comma, 10 y: the window fills at the 4th y; the comma is 5 tokens back, so the window ends after it
    # and the 10 y begin the next window
    ids, _ = prompt_windows(tokenizer, [words("x", 70) + ", " + words("y", 10)])
    assert ids[0, 0].tolist() == [bos] + [x] * 70 + [comma] + [pad] * 4 + [eos]
    assert ids[0, 1].tolist() == [bos] + [y] * 10 + [eos] + [pad] * 65
    # comma_backtrack = 0: cut at 75 tokens
    ids, _ = prompt_windows(tokenizer, [words("x", 70) + ", " + words("y", 10)], comma_backtrack=0)
    assert ids[0, 0].tolist() == [bos] + [x] * 70 + [comma] + [y] * 4 + [eos]
    assert ids[0, 1].tolist()[:8] == [bos] + [y] * 6 + [eos]
    # a comma 25 tokens back is too far (the default looks 20 back): cut at 75 tokens
    ids, _ = prompt_windows(tokenizer, [words("x", 50) + ", " + words("y", 30)])
    assert ids[0, 0].tolist() == [bos] + [x] * 50 + [comma] + [y] * 24 + [eos]
    assert prompt_windows(tokenizer, [words("x", 50) + ", " + words("y", 30)], comma_backtrack=25)[0][0, 1, 1] == y
    assert prompt_windows(tokenizer, [words("x", 50) + ", " + words("y", 30)], comma_backtrack=25)[0][0, 0, 52] == pad
    # exactly 75 tokens: nothing comes after the full window, nothing moves
    ids, _ = prompt_windows(tokenizer, [words("x", 70) + ", " + words("y", 4)])
    assert ids.shape == (1, 1, 77) and ids[0, 0, 72:76].tolist() == [y] * 4
    # a comma that begins a window is not counted for that window (A1111 forgets it when the window starts)
    ids, _ = prompt_windows(tokenizer, [words("x", 75) + ", " + words("y", 80)])
    assert ids.shape == (1, 3, 77)
    assert ids[0, 1].tolist() == [bos, comma] + [y] * 74 + [eos] and ids[0, 2].tolist()[:8] == [bos] + [y] * 6 + [eos]
    # the moved tokens keep their emphasis; the padding left behind has weight 1
    ids, weights = prompt_windows(tokenizer, [words("x", 70) + ", (" + words("y", 10) + ":1.3)"])
    assert ids[0, 1].tolist()[:12] == [bos] + [y] * 10 + [eos]
    assert weights[0, 0].tolist()[72:] == [1.0] * 5
    assert weights[0, 1].tolist()[1:11] == pytest.approx([1.3] * 10) and weights[0, 1, 11] == 1.0
    # BREAK still pads from where the moved tokens end
    ids, _ = prompt_windows(tokenizer, [words("x", 70) + ", " + words("y", 10) + " BREAK x"])
    assert ids.shape == (1, 3, 77) and ids[0, 1].tolist()[:12] == [bos] + [y] * 10 + [pad]
    assert ids[0, 2].tolist()[:3] == [bos, x, eos]


def test_a_window_ended_early_has_its_end_token_after_the_text_with_sd2_padding(tiny_sd1_dir):
    """SD2's tokenizer pads with `!`, not the end token. A1111 fills a window ended by BREAK or at a comma with end
    tokens and then pads everything after the first one: `<start> text <end> ! ! …`, as a short prompt is laid
    out — not `<start> text ! … ! <end>`."""
    tok = CLIPTokenizer.from_pretrained(tiny_sd1_dir / "tokenizer", pad_token="!")
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    assert pad != eos
    cat, dog = _tokens(tok, "a cat"), _tokens(tok, "a dog")
    ids = prompt_windows(tok, ["a cat BREAK a dog"])[0]
    assert ids[0, 0].tolist() == [bos, *cat, eos] + [pad] * (75 - len(cat))
    assert ids[0, 1].tolist() == [bos, *dog, eos] + [pad] * (75 - len(dog))
    assert prompt_windows(tok, ["BREAK a cat"])[0][0, 0].tolist() == [bos, eos] + [pad] * 75
    (x,), (y,), (comma,) = _tokens(tok, "x"), _tokens(tok, "y"), _tokens(tok, ",")
    ids = prompt_windows(tok, [" ".join(["x"] * 70) + ", " + " ".join(["y"] * 10)])[0]
    assert ids[0, 0].tolist() == [bos] + [x] * 70 + [comma, eos] + [pad] * 4
    assert ids[0, 1].tolist() == [bos] + [y] * 10 + [eos] + [pad] * 65
    assert torch.equal(prompt_windows(tok, ["a cat"])[0], token_windows(tok, ["a cat"]))


def test_break_keeps_the_emphasis_around_it(tokenizer):
    ids, weights = prompt_windows(tokenizer, ["(a cat BREAK a dog:1.5), [sun]"])
    cat, dog, sun = (len(_tokens(tokenizer, t)) for t in ("a cat", "a dog", "sun"))
    assert ids.shape == weights.shape == (1, 2, 77)
    first, second = weights[0].tolist()
    assert first[1:1 + cat] == [1.5] * cat and set(first[1 + cat:]) == {1.0}  # the padding is not weighted
    assert second[1:1 + dog] == [1.5] * dog and sum(abs(w - 1 / 1.1) < 1e-6 for w in second) == sun


def test_a_long_prompt_reads_without_the_tokenizers_length_warning(tiny_sd1_dir, caplog):
    """transformers warns that a text longer than 77 tokens "will result in indexing errors"; read in windows, it
    will not, so the warning is not shown (a fresh tokenizer: it warns only once)."""
    import logging

    def warned():
        return sum("sequence length" in r.getMessage() for r in caplog.records)

    tok = CLIPTokenizer.from_pretrained(tiny_sd1_dir / "tokenizer")
    with caplog.at_level(logging.WARNING):
        assert prompt_windows(tok, [LONG + ", " + LONG])[0].shape[1] >= 2
        token_windows(tok, [LONG], 150)
        assert warned() == 0
        tok([LONG])  # the tokenizer called plainly does warn: the capture sees it
        assert warned() == 1
