"""The settings object (FoBSegmentLib.settings)."""

import dataclasses

import pytest

from FoBSegmentLib.settings import DEFAULT_SETTINGS, SegmenterSettings


def test_settings_are_frozen_and_changed_by_copy():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DEFAULT_SETTINGS.walk.pad_px = 6.0
    s = DEFAULT_SETTINGS.with_changes(**{"walk.pad_px": 6.0, "seed.side_prior": False, "memory_cache_mb": 10})
    assert s.walk.pad_px == 6.0 and not s.seed.side_prior and s.memory_cache_mb == 10
    assert DEFAULT_SETTINGS.walk.pad_px == 4.0 and DEFAULT_SETTINGS.seed.side_prior
    assert s.walk.max_settle_prompts == DEFAULT_SETTINGS.walk.max_settle_prompts
    assert SegmenterSettings() == DEFAULT_SETTINGS
    with pytest.raises(ValueError, match="Unknown setting"):
        DEFAULT_SETTINGS.with_changes(**{"walk.nope": 1})
    with pytest.raises(ValueError, match="Unknown setting"):
        DEFAULT_SETTINGS.with_changes(nope=1)


def test_every_setting_is_documented():
    """Each field carries a comment saying what it does (the documented-tunables rule)."""
    import inspect

    import FoBSegmentLib.settings as mod

    src = inspect.getsource(mod)
    fields = []
    for top in dataclasses.fields(SegmenterSettings):
        cls = getattr(mod, top.type, None) if isinstance(top.type, str) else top.type
        if dataclasses.is_dataclass(cls):
            fields += [(cls.__name__, f.name) for f in dataclasses.fields(cls)]
        else:  # a setting of the Segmenter itself (the caches)
            fields.append(("SegmenterSettings", top.name))
    assert ("SegmenterSettings", "decode_cache") in fields and len(fields) > 20
    for owner, name in fields:
        line = next(i for i, l in enumerate(src.splitlines()) if l.strip().startswith(f"{name}:"))
        assert src.splitlines()[line - 1].strip().startswith("#:"), f"{owner}.{name} undocumented"
