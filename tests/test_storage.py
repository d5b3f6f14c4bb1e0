"""The storage tiers: bit-exact round trips, checksums, cleanup of spill files, injected I/O
errors, the buffered-I/O fallback, preflight errors, TierFull, block tables and slot transfers."""

import errno
import gc
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

from hetero.storage import (PAGE, BlockTable, BufferedIOWarning, ChecksumError, Fault, GpuPool, HostPool, NvmeStore,
                            StorageConfigError, StorageIOError, TierFull, copy_slots, direct_io, preflight, slot_runs,
                            wait_all)

ODD = (2, 3, 2, 5, 48)  # 5760 bytes in bf16: not a multiple of 4096
ALIGNED = (2, 1, 2, 16, 64)  # 8192 bytes in bf16
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def random_blocks(n, shape, dtype, seed=0):
    """Random bit patterns (NaNs and infinities included), so that any changed byte shows."""
    g = torch.Generator().manual_seed(seed)
    nbytes = n * torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).view(n, *shape)


def same_bits(a, b):
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def spill_dirs(root):
    return [p for p in os.listdir(root) if p.startswith("hetero-kv-")]


# ---- round trips ----

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [ODD, ALIGNED])
def test_memory_tiers_round_trip(shape, dtype):
    x = random_blocks(4, shape, dtype)
    for pool in (GpuPool(5, shape, dtype, device="cpu"), HostPool(5, shape, dtype), HostPool(5, shape, dtype, slot_align=1)):
        slots = pool.allocate(4)
        wait_all(pool.write(s, x[i]) for i, s in enumerate(slots))
        out = torch.full_like(x, float("nan"))
        wait_all(pool.read_into(s, out[i]) for i, s in enumerate(slots))
        assert same_bits(out, x)
        assert all(same_bits(pool.view(s), x[i]) for i, s in enumerate(slots))
        pool.close()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [ODD, ALIGNED])
@pytest.mark.parametrize("direct", [None, False])
def test_nvme_round_trip(tmp_path, shape, dtype, direct):
    x = random_blocks(6, shape, dtype, seed=1)
    host = HostPool(6, shape, dtype)
    with NvmeStore(tmp_path, 7, shape, dtype, io_threads=3, direct=direct) as store:
        slots = store.allocate(6)
        wait_all([store.write(s, x[i]) for i, s in enumerate(slots)])
        # into page-aligned host slots (no bounce), an unaligned buffer and a strided view
        h = host.allocate(6)
        wait_all([store.read_into(s, host.view(h[i])) for i, s in enumerate(slots)])
        assert all(same_bits(host.view(h[i]), x[i]) for i in range(6))
        unaligned = torch.empty(x.numel() + 1, dtype=dtype)[1:].view(x.shape)
        wait_all([store.read_into(s, unaligned[i]) for i, s in enumerate(slots)])
        assert same_bits(unaligned, x)
        strided = torch.empty(*shape[:-1], 2 * shape[-1], dtype=dtype)[..., ::2]
        store.read_into(slots[2], strided).wait()
        assert same_bits(strided, x[2])
        # written from a host slot and from an unaligned source
        store.write(slots[0], host.view(h[5])).wait()
        store.write(slots[1], unaligned[4]).wait()
        out = torch.empty(2, *shape, dtype=dtype)
        wait_all([store.read_into(slots[0], out[0]), store.read_into(slots[1], out[1])])
        assert same_bits(out[0], x[5]) and same_bits(out[1], x[4])
        assert store.bytes_in_use() == 6 * store.slot_bytes and store.slot_bytes % PAGE == 0


def test_nvme_writes_and_reads_in_flight_keep_order(tmp_path):
    x = random_blocks(3, ODD, torch.bfloat16, seed=2)
    with NvmeStore(tmp_path, 4, ODD, io_threads=4) as store:
        (s,) = store.allocate(1)
        store.write(s, x[0])
        store.write(s, x[1])
        last = store.write(s, x[2])
        out = torch.empty(ODD, dtype=torch.bfloat16)
        store.read_into(s, out).wait()  # issued before the writes finished: still sees the last
        assert last.done() and same_bits(out, x[2])


def test_host_pool_slots_are_page_aligned_zero_copy_views():
    pool = HostPool(5, ODD, torch.bfloat16, pin=False)
    assert pool.slot_bytes == 8192 and pool.slab.shape == (5, *ODD)
    assert all(pool.view(s).data_ptr() % PAGE == 0 and pool.view(s).is_contiguous() for s in range(5))
    assert pool.view(3).data_ptr() == pool.slab.data_ptr() + 3 * pool.slot_bytes
    assert HostPool(5, ALIGNED, torch.bfloat16, huge_pages=False).slab.is_contiguous()
    assert HostPool(5, ODD, torch.bfloat16, slot_align=1).slab.is_contiguous()
    assert pool.slab.untyped_storage().data_ptr() % (2 << 20) == 0
    assert not pool.pinned and pool.fits(4, ODD, torch.bfloat16, pin=False)


def _thp_mode():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


def _thp_eligible(tensor):
    """THPeligible of the mapping the tensor lies in (/proc/self/smaps), or None where not reported."""
    from hetero.storage.host_pool import mapping_fields

    values = mapping_fields(tensor, "THPeligible")
    return values[0] == "1" if values else None


@pytest.mark.skipif(_thp_mode() not in ("always", "madvise"), reason="Linux with transparent huge pages")
def test_host_pool_slab_may_take_huge_pages_unless_told_not_to():
    """The slab's mapping is one Linux backs with huge pages when asked: a shared anonymous
    mapping (Python's mmap default) is not, whatever madvise says, and was not until this test."""
    one_mib = (2, 1, 8, 256, 128)  # a huge page is 2 MiB: a smaller mapping never gets one
    advised = HostPool(4, one_mib, torch.bfloat16, pin=False)
    plain = HostPool(4, one_mib, torch.bfloat16, pin=False, huge_pages=False)
    if _thp_eligible(advised.slab) is None:
        pytest.skip("this kernel's smaps has no THPeligible")
    assert _thp_eligible(advised.slab)
    assert _thp_eligible(plain.slab) == (_thp_mode() == "always")


def test_huge_page_share_reads_the_mappings_a_tensor_lies_in(tmp_path):
    from hetero.storage.host_pool import huge_page_share

    x = torch.empty(4 << 20, dtype=torch.uint8)
    first = x.data_ptr()
    smaps = tmp_path / "smaps"
    smaps.write_text(
        f"{first - 8192:x}-{first + (1 << 20):x} rw-p 00000000 00:00 0\nSize: 1032 kB\nAnonHugePages: 0 kB\n"
        f"{first + (1 << 20):x}-{first + (8 << 20):x} rw-p 00000000 00:00 0\nAnonHugePages: 2048 kB\n"
        f"{first + (8 << 20):x}-{first + (9 << 20):x} rw-p 00000000 00:00 0\nAnonHugePages: 1024 kB\n")
    assert huge_page_share(x, str(smaps)) == 0.5
    assert huge_page_share(x[1:].view(-1, 3), str(smaps)) == 0.5  # a view: its whole storage
    assert huge_page_share(x, str(tmp_path / "missing")) is None


# ---- checksums ----

@pytest.mark.parametrize("aligned_dst", [True, False])
def test_flipped_byte_is_caught_and_named(tmp_path, aligned_dst):
    x = random_blocks(3, ODD, torch.bfloat16, seed=3)
    with NvmeStore(tmp_path, 3, ODD, io_threads=2) as store:
        slots = store.allocate(3)
        wait_all([store.write(s, x[i]) for i, s in enumerate(slots)])
        fd = os.open(store.path, os.O_RDWR)
        at = slots[1] * store.slot_bytes + 4100  # in the block's tail page
        byte = os.pread(fd, 1, at)
        os.pwrite(fd, bytes([byte[0] ^ 0x10]), at)
        os.fsync(fd)
        os.close(fd)
        host = HostPool(1, ODD, torch.bfloat16)
        dst = host.view(0) if aligned_dst else torch.empty(x[0].numel() + 1, dtype=torch.bfloat16)[1:].view(ODD)
        dst.fill_(1.0)
        with pytest.raises(ChecksumError) as err:
            store.read_into(slots[1], dst).wait()
        assert store.path in str(err.value) and f"slot {slots[1]}" in str(err.value)
        assert err.value.filename == store.path and err.value.slot == slots[1]
        assert not same_bits(dst, x[1])  # never handed out as data
        for i in (0, 2):  # neighbours intact
            store.read_into(slots[i], dst).wait()
            assert same_bits(dst, x[i])


# ---- spill files are removed ----

def test_spill_dir_private_and_removed_on_close(tmp_path):
    store = NvmeStore(tmp_path, 4, ODD)
    assert os.stat(store.dir).st_mode & 0o777 == 0o700
    assert os.stat(store.path).st_mode & 0o777 == 0o600
    assert os.path.getsize(store.path) == 4 * store.slot_bytes  # preallocated
    store.close()
    store.close()
    assert spill_dirs(tmp_path) == []
    with pytest.raises(ValueError, match="closed"):
        store.read_into(0, torch.empty(ODD, dtype=torch.bfloat16))


def test_spill_dir_removed_after_exception_and_after_gc(tmp_path):
    with pytest.raises(RuntimeError):
        with NvmeStore(tmp_path, 4, ODD) as store:
            store.write(store.allocate(1)[0], random_blocks(1, ODD, torch.bfloat16)[0])
            raise RuntimeError("boom")
    assert spill_dirs(tmp_path) == []
    store = NvmeStore(tmp_path, 4, ODD)
    store.write(store.allocate(1)[0], random_blocks(1, ODD, torch.bfloat16)[0]).wait()
    assert len(spill_dirs(tmp_path)) == 1
    del store
    gc.collect()
    assert spill_dirs(tmp_path) == []


def test_spill_dir_removed_at_exit_and_after_keyboard_interrupt(tmp_path):
    procs = {}
    for ending in ("exit", "sigint"):  # two interpreters at once: each spends seconds importing
        root = tmp_path / ending
        root.mkdir()
        script = textwrap.dedent(f"""
            import os, signal, time, torch
            from hetero.storage import NvmeStore
            store = NvmeStore({str(root)!r}, 8, (2, 1, 2, 16, 64))
            store.write(store.allocate(1)[0], torch.ones(2, 1, 2, 16, 64, dtype=torch.bfloat16)).wait()
            print(store.dir, flush=True)
            if {ending!r} == "sigint":
                # A shell that starts jobs in the background has them ignore SIGINT: restore Python's handler.
                signal.signal(signal.SIGINT, signal.default_int_handler)
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
        """)
        procs[ending] = (root, subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE, text=True))
    for ending, (root, proc) in procs.items():
        out, err = proc.communicate(timeout=120)
        assert out.strip().startswith(str(root)), err
        assert ("KeyboardInterrupt" in err) == (ending == "sigint"), err
        assert spill_dirs(root) == []


# ---- I/O errors ----

@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_injected_write_error_mid_way(tmp_path, code):
    x = random_blocks(5, ODD, torch.float16, seed=4)
    host = HostPool(5, ODD, torch.float16)
    h = host.allocate(5)
    for i, s in enumerate(h):
        host.write(s, x[i])
    store = NvmeStore(tmp_path, 5, ODD, torch.float16, io_threads=2, fault=Fault("write", nth=3, errno=code))
    slots = store.allocate(5)
    pending = [store.write(s, host.view(h[i])) for i, s in enumerate(slots)]
    with pytest.raises(StorageIOError) as err:
        wait_all(pending)
    assert err.value.errno == code and err.value.filename == store.path and store.path in str(err.value)
    assert ("full" in str(err.value)) == (code == errno.ENOSPC)
    failed = [i for i, p in enumerate(pending) if not _ok(p)]
    assert len(failed) == 1
    with pytest.raises(StorageIOError, match="holds no data"):
        store.read_into(slots[failed[0]], torch.empty(ODD, dtype=torch.float16)).wait()
    good = [i for i in range(5) if i not in failed]
    out = torch.empty(ODD, dtype=torch.float16)
    for i in good:
        store.read_into(slots[i], out).wait()
        assert same_bits(out, x[i])
    assert same_bits(host.slab[h], x)  # the host tier is untouched
    store.close()
    assert spill_dirs(tmp_path) == []


def test_injected_read_error(tmp_path):
    store = NvmeStore(tmp_path, 2, ALIGNED, fault=Fault("read", nth=1, errno=errno.EIO))
    (s,) = store.allocate(1)
    store.write(s, random_blocks(1, ALIGNED, torch.bfloat16)[0]).wait()
    with pytest.raises(StorageIOError, match="reading block slot 0 of .*kv.bin"):
        store.read_into(s, torch.empty(ALIGNED, dtype=torch.bfloat16)).wait()
    store.close()
    assert spill_dirs(tmp_path) == []


def _ok(p):
    try:
        p.wait()
        return True
    except StorageIOError:
        return False


# ---- O_DIRECT fallback and preflight ----

def test_no_o_direct_falls_back_to_buffered_io_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(direct_io, "direct_io_supported", lambda d: False)  # tmpfs before Linux 6.6
    with pytest.warns(BufferedIOWarning, match="ssd_dir"):
        store = NvmeStore(tmp_path, 3, ODD)
    assert not store.direct
    x = random_blocks(1, ODD, torch.bfloat16)[0]
    out = torch.empty_like(x)
    store.write(store.allocate(1)[0], x).wait()
    store.read_into(0, out).wait()
    assert same_bits(out, x)
    store.close()


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")
def test_tmpfs_works_with_or_without_o_direct():
    import warnings
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        store = NvmeStore("/dev/shm", 2, ODD)
    assert store.direct == (not any(issubclass(w.category, BufferedIOWarning) for w in seen))
    x = random_blocks(1, ODD, torch.bfloat16)[0]
    out = torch.empty_like(x)
    store.write(store.allocate(1)[0], x).wait()
    store.read_into(0, out).wait()
    assert same_bits(out, x)
    store.close()
    assert not os.path.exists(store.dir)


def _one_line_naming(err, key):
    assert err.value.key == key and str(err.value).startswith(key + ":") and "\n" not in str(err.value)
    assert pickle.loads(pickle.dumps(err.value)).key == key


def test_preflight_errors_name_the_key(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(StorageConfigError) as err:
        preflight(ssd_dir=a_file, ssd_kv_bytes=1)
    _one_line_naming(err, "ssd_dir")
    with pytest.raises(StorageConfigError) as err:
        preflight(ssd_dir=a_file / "sub", ssd_kv_bytes=1)
    _one_line_naming(err, "ssd_dir")
    with pytest.raises(StorageConfigError) as err:
        preflight(ssd_dir=tmp_path, ssd_kv_bytes=1 << 60)
    _one_line_naming(err, "ssd_kv_bytes")
    with pytest.raises(StorageConfigError) as err:
        preflight(cpu_kv_bytes=1 << 60)
    _one_line_naming(err, "cpu_kv_bytes")
    with pytest.raises(StorageConfigError) as err:
        NvmeStore(tmp_path, 1 << 40, ALIGNED)
    _one_line_naming(err, "ssd_kv_bytes")
    assert spill_dirs(tmp_path) == []
    ok = preflight(cpu_kv_bytes=1 << 20, ssd_dir=tmp_path / "new" / "dir", ssd_kv_bytes=1 << 20)
    assert (tmp_path / "new" / "dir").is_dir() and ok.direct_io in (True, False) and ok.ssd_free_bytes > 0


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_preflight_unwritable_dir(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(StorageConfigError) as err:
        preflight(ssd_dir=locked, ssd_kv_bytes=1)
    _one_line_naming(err, "ssd_dir")


# ---- allocation ----

def test_tier_full_and_free_list(tmp_path):
    for tier in (GpuPool(3, ODD, device="cpu"), HostPool(3, ODD), NvmeStore(tmp_path, 3, ODD)):
        assert tier.allocate(2) == [0, 1] and tier.bytes_in_use() == 2 * tier.slot_bytes
        with pytest.raises(TierFull, match=f"{tier.name} tier full: asked for 2 block slot\\(s\\), 1 free of 3"):
            tier.allocate(2)
        tier.free([0])
        assert tier.allocate(2) == [0, 2] and tier.free_slots() == 0
        with pytest.raises(ValueError, match="not allocated"):
            tier.free([0, 0])
        with pytest.raises(ValueError, match="not allocated"):
            tier.write(7, torch.empty(ODD, dtype=torch.bfloat16))
        with pytest.raises(ValueError, match="expected torch.bfloat16"):
            tier.write(1, torch.empty(ODD, dtype=torch.float32))
        assert tier.budget == 3 * tier.slot_bytes
        tier.close()
    assert isinstance(pickle.loads(pickle.dumps(TierFull("host", 2, 1, 3, 10))), TierFull)


# ---- block table and transfers ----

def test_block_table_append_move_lookup():
    t = BlockTable(2, capacity=2)
    for j in range(5):  # grows past its capacity
        assert t.append(0, "host", 10 + j) == j
    assert t.extend(1, "gpu", [3, 4]) == range(0, 2)
    old = t.move(0, 2, "ssd", 7)
    assert old == ("host", 12) and t.lookup(0, 2) == ("ssd", 7)
    assert t.slots(0).dtype == torch.int32 and t.slots(0).tolist() == [10, 11, 7, 13, 14]
    blocks, slots = t.blocks_in(0, "host")
    assert blocks.tolist() == [0, 1, 3, 4] and slots.tolist() == [10, 11, 13, 14] and slots.dtype == torch.int32
    blocks, slots = t.blocks_in(0, "host", start=1, end=4)
    assert blocks.tolist() == [1, 3] and slots.tolist() == [11, 13]
    assert t.count_in("ssd") == 1 and t.count_in("gpu") == 2
    with pytest.raises(IndexError):
        t.lookup(0, 5)
    with pytest.raises(ValueError, match="tier"):
        t.append(0, "tape", 1)
    assert sorted(t.clear(0)) == [("host", [10, 11, 13, 14]), ("ssd", [7])] and t.num_blocks(0) == 0


def test_block_table_append_does_not_copy_slots_each_time():
    t = BlockTable(1, capacity=4)
    ptrs = set()
    for j in range(64):
        t.append(0, "host", j)
        ptrs.add(t.slots(0).data_ptr())
    assert len(ptrs) <= 5  # capacity doubles: 4, 8, 16, 32, 64


@pytest.mark.parametrize("shape", [ODD, ALIGNED])
def test_copy_slots_by_runs(shape):
    assert slot_runs([1, 2, 3, 7, 8, 4], [0, 1, 2, 5, 6, 3]) == [(1, 0, 3), (7, 5, 2), (4, 3, 1)]
    assert slot_runs(torch.tensor([4, 5, 9], dtype=torch.int32), range(3)) == [(4, 0, 2), (9, 2, 1)]
    assert slot_runs([], []) == []
    with pytest.raises(ValueError, match="as many"):
        slot_runs([1, 2], [1])
    x = random_blocks(10, shape, torch.bfloat16, seed=5)
    host = HostPool(10, shape)
    for s in host.allocate(10):
        host.write(s, x[s])
    gpu = GpuPool(8, shape, device="cpu")
    src, dst = [1, 2, 3, 7, 8, 4], [0, 1, 2, 5, 6, 3]
    copies = copy_slots(host.slab, src, gpu.slab, dst)
    assert copies == (3 if host.slab.is_contiguous() else 6)
    assert same_bits(gpu.slab[dst], x[src])
    back = HostPool(8, shape)
    copy_slots(gpu.slab, dst, back.slab, [7, 6, 5, 4, 3, 2])
    assert same_bits(back.slab[[7, 6, 5, 4, 3, 2]], x[src])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_host_pool_to_gpu_and_ssd(tmp_path):
    x = random_blocks(6, ODD, torch.bfloat16, seed=6)
    host = HostPool(6, ODD)
    assert host.pinned and host.slab.is_pinned() and host.allocate(6) == list(range(6))
    gpu = GpuPool(6, ODD)
    gpu.allocate(6)
    assert gpu.slab.is_cuda
    with NvmeStore(tmp_path, 6, ODD) as store:
        s = store.allocate(6)
        wait_all([store.write(s[i], x[i]) for i in range(6)])
        wait_all([store.read_into(s[i], host.view(i)) for i in range(6)])
    copy_slots(host.slab, range(6), gpu.slab, range(6), non_blocking=True)
    torch.cuda.synchronize()
    assert same_bits(gpu.slab.cpu(), x)
    gpu.write(0, x[5].cuda())
    host.write(1, gpu.view(0))
    assert same_bits(host.view(1), x[5])
    host.close()
    assert not host.pinned
