"""Target cache: the on-disk format, its reader, and the stage that builds it."""

from deepspec.cache.format import UNIT_RECORDS, CacheFormatError, Layout, UnitWriter
from deepspec.cache.reader import CacheReader, collate

__all__ = ["UNIT_RECORDS", "CacheFormatError", "CacheReader", "Layout", "UnitWriter", "collate"]
