"""Read back what W&B wrote offline: the `run-*.wandb` file is a leveldb-style log of protobuf `Record`s."""

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK_SIZE = 32 * 1024
HEADER_SIZE = 7  # checksum (4 bytes), length (2), record type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_wandb_records(path: Path) -> list:
    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    records, pending, offset = [], b"", 7  # the file header (":W&B", magic, version) opens the first block
    while offset + HEADER_SIZE <= len(data):
        if BLOCK_SIZE - offset % BLOCK_SIZE < HEADER_SIZE:  # the rest of a block too short for a header is padding
            offset += BLOCK_SIZE - offset % BLOCK_SIZE
            continue
        _, length, record_type = struct.unpack("<IHB", data[offset : offset + HEADER_SIZE])
        chunk = data[offset + HEADER_SIZE : offset + HEADER_SIZE + length]
        offset += HEADER_SIZE + length
        if record_type in (FULL, FIRST):
            pending = chunk
        elif record_type in (MIDDLE, LAST):
            pending += chunk
        if record_type in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_history(run_dir: Path) -> list[dict]:
    """The rows logged with `run.log`, as {key: value}."""
    (run_file,) = run_dir.glob("run-*.wandb")
    rows = []
    for record in read_wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
    return rows


def wandb_config(run_dir: Path) -> dict:
    (run_file,) = run_dir.glob("run-*.wandb")
    config = {}
    for record in read_wandb_records(run_file):
        if record.WhichOneof("record_type") == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    return config


def wandb_records(run_dir: Path, record_type: str) -> list:
    """The records of one type ("run", "artifact", ...) of an offline run folder."""
    (run_file,) = run_dir.glob("run-*.wandb")
    return [
        getattr(record, record_type)
        for record in read_wandb_records(run_file)
        if record.WhichOneof("record_type") == record_type
    ]
