"""The KV transport between processes (runtime/kv_transport.TorchDistributedTransport): a prefill
engine in one gloo process hands each request's KV blocks to a decode engine in another, which
finishes the requests with the colocated engine's greedy tokens; the prefill side frees its
blocks only on the acknowledgement; a cancelled transfer is dropped where it arrives."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from runtime_models import sample_prompts, tiny_spec

from flowc.compiler.optimize.instance_plan import instance_plan
from flowc.runtime.engine import Engine, Request
from flowc.runtime.kv_transport import KVTransfer, TorchDistributedTransport, export_blocks, import_blocks, kv_layout
from flowc.runtime.parallel import free_port
from flowc.runtime.sequence import SamplingParams

SPEC = tiny_spec("llama")
SETTINGS = dict(max_batched_tokens=32, chunk_size=16, max_seqs=4, kv_blocks=16)
MAX_TOKENS = [12, 7, 16]
CANCELLED = "r-cancelled"


def _requests() -> list[Request]:
    prompts = sample_prompts(SPEC.vocab)[:len(MAX_TOKENS)]
    return [Request(p, SamplingParams(max_tokens=n)) for p, n in zip(prompts, MAX_TOKENS)]


def _prefill_side(engine: Engine, transport: TorchDistributedTransport) -> dict:
    """Prefill every request, then per request: send its state, learn the decode side's blocks,
    send the KV. Blocks are freed only as acknowledgements come back."""
    blocks = engine.scheduler.block_manager
    for i, request in enumerate(_requests()):
        engine._queue(request, f"r{i}", engine.now(), handoff=True)
    prefilled = []
    while len(prefilled) < len(MAX_TOKENS):
        engine.poll()
        prefilled += engine.scheduler.take_prefilled()
    held = {}
    for seq in prefilled:
        output = engine.hand_off(seq.request_id)
        message = [(seq, output)]
        dist.send_object_list(message, dst=1)  # the router's part: the decode side takes the request over
        reply = [None]
        dist.recv_object_list(reply, src=1)
        dst_blocks = reply[0]
        src = seq.block_ids[:len(dst_blocks)]
        transfer = KVTransfer(seq.request_id, 0, 0, tuple(src), tuple(dst_blocks), seq.num_tokens - 1,
                              kv_layout(engine))
        transport.send(transfer, export_blocks(engine, src))
        held[seq.request_id] = seq
    # a transfer cancelled on its way: the decode side drops it where it arrives
    transport.send(KVTransfer(CANCELLED, 0, 0, (0,), (0,), 1, kv_layout(engine)), export_blocks(engine, [0]))
    still_held = []
    while held:
        for transfer in transport.acks(0):
            still_held.append(blocks.num_used > 0)
            engine.scheduler.release(transfer.request_id)
            del held[transfer.request_id]
    transport.close()
    return {"held_until_ack": all(still_held), "freed": blocks.num_used == 0}


def _decode_side(engine: Engine, transport: TorchDistributedTransport) -> dict:
    transport.cancel(CANCELLED)
    outputs = {}
    for _ in MAX_TOKENS:
        message = [None]
        dist.recv_object_list(message, src=0)
        seq, output = message[0]
        received = engine.take_over(seq, output)
        outputs[seq.request_id] = output
        dist.send_object_list([list(received.block_ids)], dst=0)
    arrived = []
    while len(arrived) < len(MAX_TOKENS):
        for transfer, blocks in transport.recv(0):
            assert transfer.request_id != CANCELLED
            import_blocks(engine, list(transfer.dst_blocks), blocks)
            engine.scheduler.arrived(transfer.request_id)
            transport.ack(transfer)
            arrived.append(transfer.request_id)
    while not all(o.finish_reason for o in outputs.values()):
        engine.poll()
    transport.close()
    return {rid: o.output_token_ids for rid, o in sorted(outputs.items())}


def _rank(rank: int, port: int, weights: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        engine = Engine.from_plan(instance_plan(SPEC, **SETTINGS), weights)
        transport = TorchDistributedTransport(rank, producers={0: 0}, consumers={0: 1})
        side = _prefill_side if rank == 0 else _decode_side
        results.put((rank, side(engine, transport)))
        dist.barrier()
        engine.close()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def llama(saved):
    return saved("llama")


def test_kv_moves_between_processes_and_decoding_matches_the_colocated_engine(llama):
    with Engine.from_plan(instance_plan(SPEC, **SETTINGS), llama) as engine:
        colocated = {f"r{i}": o.output_token_ids for i, o in enumerate(engine.generate(_requests()))}
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=_rank, args=(rank, port, str(llama), results)) for rank in (0, 1)]
    for process in processes:
        process.start()
    found = dict(results.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    assert found[1] == colocated
    assert found[0] == {"held_until_ack": True, "freed": True}
