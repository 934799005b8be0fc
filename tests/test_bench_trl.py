"""bench/trl_compare.py's model view for TRL's transformers 4.57: the tokenizer rewritten as
vocab.json + merges.txt must tokenize exactly as herd-jax's tokenizer.json does (checked here with
transformers 5 reading the rewritten files; the TRL environment itself is not part of the suite)."""
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


def test_trl_readable_tokenizer_tokenizes_like_the_original(tmp_path):
    from transformers import CLIPTokenizer

    import trl_compare
    from herd_jax.models import tiny_model_path

    model = tiny_model_path()
    view = pathlib.Path(trl_compare.trl_readable(str(model), str(tmp_path)))
    assert view != model and sorted(p.name for p in (view / "tokenizer").iterdir()) == ["merges.txt", "tokenizer_config.json", "vocab.json"]
    assert (view / "unet").resolve() == (model / "unet").resolve()  # the other components are links
    original, rewritten = CLIPTokenizer.from_pretrained(model / "tokenizer"), CLIPTokenizer.from_pretrained(view / "tokenizer")
    prompts = ["a red ball", "an orange cat, photorealistic", "The quick brown fox jumps over the lazy dog", ""]
    for prompt in prompts:
        assert rewritten(prompt, padding="max_length", max_length=16).input_ids == original(prompt, padding="max_length", max_length=16).input_ids
    assert trl_compare.trl_readable(str(view), str(tmp_path)) == str(view)  # already readable: used as is
