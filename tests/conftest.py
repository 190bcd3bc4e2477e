import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def tiny_ckpts(tmp_path_factory):
    """family -> (transformers model, checkpoint folder) of a tiny random model, made lazily once per module."""
    from tiny_models import make_tiny

    root = tmp_path_factory.mktemp("tiny")
    made = {}

    def get(family):
        if family not in made:
            made[family] = (make_tiny(family, root / family), root / family)
        return made[family]
    return get
