"""Put this folder on PYTHONPATH and a Python process starts as on an image
without the data pipeline's packages: importing grain, tensorflow-datasets or
tensorboardX fails as for a package that is not installed."""

import importlib.abc
import sys

REFUSED = {"grain", "tensorflow_datasets", "tfds", "tensorboardX"}


class _Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in REFUSED:
            raise ModuleNotFoundError(f"No module named {name!r} (refused: model-only)", name=name)
        return None


sys.meta_path.insert(0, _Refuse())
