"""`serve --help` lists every setting once, in its section (model, server, batching …), not in one flat list."""

from __future__ import annotations

import argparse
from collections import Counter

from diffuserve.config import Settings, add_settings_arguments
from diffuserve.setting_groups import SETTING_GROUPS


def test_every_setting_sits_in_exactly_one_section() -> None:
    placed = Counter(name for names in SETTING_GROUPS.values() for name in names)
    assert set(placed) == set(Settings.model_fields), set(placed) ^ set(Settings.model_fields)
    assert all(count == 1 for count in placed.values()), placed.most_common(3)


def test_help_shows_the_sections_in_order_each_with_its_flags() -> None:
    parser = argparse.ArgumentParser(prog="diffuserve serve")
    add_settings_arguments(parser)
    text = parser.format_help()
    starts = [text.index(f"\n{title}:\n") for title in SETTING_GROUPS]
    assert starts == sorted(starts)
    model = text[starts[0] : starts[1]]
    assert "--model " in model and "--tier" in model and "--port" not in model
    adapters = text[text.index("\nadapters (LoRA):\n") :]
    assert "--lora-dir" in adapters.split("\n\n")[0]
