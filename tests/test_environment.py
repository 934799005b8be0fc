"""The test session's environment (tests/conftest.py): the Hugging Face caches are its own."""
import os
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]


def _inside_session_home(path) -> bool:
    home = pathlib.Path(os.environ.get("HF_HOME", "/nonexistent")).resolve()
    return home.parent == (REPO / ".cache").resolve() and home.name.startswith("hf-home-") and pathlib.Path(path).resolve().is_relative_to(home)


def test_hugging_face_caches_are_isolated():
    import diffusers.utils.constants
    import huggingface_hub.constants
    import transformers.utils.hub

    hub = huggingface_hub.constants
    paths = {
        "HF_HOME": hub.HF_HOME,
        "HF_HUB_CACHE": hub.HF_HUB_CACHE,
        "HF_ASSETS_CACHE": hub.HF_ASSETS_CACHE,
        "HF_XET_CACHE": hub.HF_XET_CACHE,
        "HF_TOKEN_PATH": hub.HF_TOKEN_PATH,
    }
    for module, names in ((transformers.utils.hub, ("TRANSFORMERS_CACHE", "HF_MODULES_CACHE")), (diffusers.utils.constants, ("HF_MODULES_CACHE",))):
        paths.update({f"{module.__name__}.{n}": getattr(module, n) for n in names if hasattr(module, n)})  # (transformers 5 dropped some)
    outside = {name: path for name, path in paths.items() if not _inside_session_home(path)}
    assert not outside, f"caches outside the test session's HF_HOME: {outside}"
    assert hub.HF_HUB_OFFLINE
