"""KV representations beyond dense, one per file. Importing a module registers it in
mcomp.runtime.kvcache.KV_REPRESENTATIONS (kvcache imports this package at its end)."""
from . import kivi  # noqa: F401
