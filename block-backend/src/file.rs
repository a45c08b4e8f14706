//! Raw file or block device as a `BlockDevice` (being written).
