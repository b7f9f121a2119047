"""The settings object (FoBSegmentLib.settings)."""

import dataclasses
from pathlib import Path

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


@pytest.mark.parametrize("change,message", [
    ({"walk.pad_px": -5}, "walk.pad_px must be at least 0"),
    ({"presence.min_iou": 2.0}, "presence.min_iou must be from 0 to 1"),
    ({"seed.walks": 0}, "seed.walks must be at least 1"),
    ({"seed.walks": 2.5}, "seed.walks must be a whole number"),
    ({"decode_cache": "no"}, "decode_cache must be True or False"),
    ({"walk.pad_px": "6"}, "walk.pad_px must be a number"),
    ({"contrast.levels": 0.1}, "contrast.levels must be a tuple of numbers"),
    ({"walk": 3}, "walk must be a WalkSettings"),
    ({"presence.min_area_px": None}, "presence.min_area_px must be given"),
    ({"walk.padpx": 1}, "known: walk.pad_px"),
    ({"contrast.position_sigma_px": 0}, "position_sigma_px must be more than 0"),
])
def test_a_setting_out_of_its_kind_or_range_is_refused(change, message):
    """A wrong value is an input error naming the setting, not a failure deep inside a run or
    a run that silently segments nothing."""
    from FoBSegmentLib.errors import FoBInputError

    with pytest.raises(FoBInputError, match=message):
        DEFAULT_SETTINGS.with_changes(**change)


def test_every_measured_variant_is_a_valid_setting():
    """The variants the benchmark pages were measured with (signed floors, 'never' sentinels such
    as same_structure_dice 1.01, None) stay valid settings."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
    from default_settings import VARIANTS

    for _name, _why, changes in VARIANTS:
        DEFAULT_SETTINGS.with_changes(**changes)
    DEFAULT_SETTINGS.with_changes(**{"seed.same_structure_dice": 1.01, "presence.min_contrast": -0.5,
                                     "contrast.split_fraction": None, "seed.agreement_weight": 0.0})


def test_a_default_segmenter_keeps_the_cache_folder_within_the_documented_limits(litemedsam, tmp_path):
    """README: the cache folder keeps at most 10 GB of embeddings and 2 GB of decoded masks."""
    from FoBSegmentLib import Segmenter

    seg = Segmenter(litemedsam, cache_dir=tmp_path)
    assert seg.cache.disk_bytes == 10 * 2**30 and seg.decoded.disk_bytes == 2 * 2**30
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    assert "at most 10 GB of embeddings and 2 GB of" in readme
