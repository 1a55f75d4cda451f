"""The peer the benches compare with: HypotheSAEs' SparseAutoencoder, loaded from its sae.py as a file.

HypotheSAEs is installed with `pip install --no-deps hypothesaes`; its package __init__ imports more than
the model needs, so only sae.py is loaded.
"""
import importlib.util
import os
import sys


def load_hypothesaes():
    spec = importlib.util.find_spec("hypothesaes")
    if spec is None:
        sys.exit("HypotheSAEs is not installed: pip install --no-deps hypothesaes")
    path = os.path.join(list(spec.submodule_search_locations)[0], "sae.py")
    module_spec = importlib.util.spec_from_file_location("hypothesaes_sae", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module
