//! A power cut for SQLite files: a VFS that wraps the platform's own and
//! remembers, per database and WAL file, what an fsync has made durable and
//! which writes have happened since. A test makes it "lose power" after a
//! chosen number of writes, truncates and syncs: from then on nothing
//! reaches the files, and once every connection is closed,
//! [`PowerCut::restore`] puts on disk what a machine could find after the
//! cut: the synced content, plus any subset of the unsynced writes (a disk
//! may have written some of them on its own, in any order). The `-shm`
//! index is removed, as a reboot loses it.
//!
//! The VFS is registered as SQLite's default for the whole test process, so
//! code under test opens its files as usual. One cut at a time: a test holds
//! the [`PowerCut`] returned by [`install`] while it runs.

use std::collections::HashMap;
use std::ffi::{CStr, c_char, c_int, c_void};
use std::path::Path;
use std::sync::{LazyLock, Mutex, MutexGuard, OnceLock};

use rusqlite::ffi;
use sluice_core::rng::SplitMix64;

/// A change to a file since its last sync.
enum Op {
    Write(u64, Vec<u8>),
    Truncate(u64),
}

impl Op {
    fn apply(&self, image: &mut Vec<u8>) {
        match self {
            Op::Write(at, data) => {
                let (at, end) = (*at as usize, *at as usize + data.len());
                if image.len() < end {
                    image.resize(end, 0);
                }
                image[at..end].copy_from_slice(data);
            }
            Op::Truncate(len) => image.truncate(*len as usize),
        }
    }
}

#[derive(Default)]
struct Track {
    /// The content as of the last sync (`None`: never synced, so the file
    /// itself may not survive).
    durable: Option<Vec<u8>>,
    /// Writes and truncates since then, in order.
    pending: Vec<Op>,
}

#[derive(Default)]
struct State {
    files: HashMap<String, Track>,
    /// The power is off: writes, truncates, syncs and deletes fail.
    cut: bool,
    /// Mutating operations (writes, truncates, syncs) left before the cut.
    countdown: Option<u64>,
    /// Mutating operations seen since [`install`].
    ops: u64,
}

impl State {
    /// Counts one mutating operation; true if the power is (now) off.
    fn tick(&mut self) -> bool {
        if self.cut {
            return true;
        }
        self.ops += 1;
        if let Some(left) = self.countdown.as_mut() {
            if *left <= 1 {
                self.cut = true;
                self.countdown = None;
                return true;
            }
            *left -= 1;
        }
        false
    }
}

static STATE: LazyLock<Mutex<State>> = LazyLock::new(Default::default);
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
/// The platform's VFS (address), which this one forwards to.
static REAL: OnceLock<usize> = OnceLock::new();

fn state() -> MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

fn real_vfs() -> *mut ffi::sqlite3_vfs {
    *REAL.get().expect("installed") as *mut ffi::sqlite3_vfs
}

/// Our file: the SQLite handle (whose methods are ours), the path, and the
/// platform's file after it.
#[repr(C)]
struct Header {
    base: ffi::sqlite3_file,
    name: *mut String,
}

const HEADER: usize = std::mem::size_of::<Header>().next_multiple_of(16);

/// The platform's file inside ours.
///
/// # Safety
/// `file` is one of ours, opened by [`x_open`] as tracked.
unsafe fn inner(file: *mut ffi::sqlite3_file) -> *mut ffi::sqlite3_file {
    // SAFETY: x_open allocated HEADER bytes before the platform's file
    // (szOsFile includes them), so the offset stays inside the allocation.
    unsafe { file.cast::<u8>().add(HEADER).cast() }
}

/// The tracked path of one of our files.
///
/// # Safety
/// `file` is one of ours, opened by [`x_open`] as tracked and not closed.
unsafe fn name<'a>(file: *mut ffi::sqlite3_file) -> &'a str {
    // SAFETY: x_open stored a leaked Box<String> there, freed in x_close.
    unsafe { &*(*file.cast::<Header>()).name }
}

/// Calls the platform's method `$m` on the file inside ours.
macro_rules! forward {
    ($file:expr, $m:ident $(, $arg:expr)*) => {{
        // SAFETY: callers pass a file opened by x_open as tracked; the
        // platform's file was opened by the platform's xOpen, which set its
        // methods (all present in the platform's version-3 methods).
        unsafe {
            let real = inner($file);
            match (*(*real).pMethods).$m {
                Some(f) => f(real $(, $arg)*),
                None => ffi::SQLITE_IOERR,
            }
        }
    }};
}

unsafe extern "C" fn x_close(file: *mut ffi::sqlite3_file) -> c_int {
    let rc = forward!(file, xClose);
    // SAFETY: the name was leaked by x_open for this file; SQLite closes a
    // file once.
    unsafe {
        let header = file.cast::<Header>();
        drop(Box::from_raw((*header).name));
        (*header).name = std::ptr::null_mut();
    }
    rc
}

unsafe extern "C" fn x_read(
    file: *mut ffi::sqlite3_file,
    buf: *mut c_void,
    amount: c_int,
    offset: ffi::sqlite3_int64,
) -> c_int {
    forward!(file, xRead, buf, amount, offset)
}

unsafe extern "C" fn x_write(
    file: *mut ffi::sqlite3_file,
    buf: *const c_void,
    amount: c_int,
    offset: ffi::sqlite3_int64,
) -> c_int {
    let mut st = state();
    if st.tick() {
        return ffi::SQLITE_IOERR_WRITE;
    }
    let rc = forward!(file, xWrite, buf, amount, offset);
    if rc == ffi::SQLITE_OK {
        // SAFETY: SQLite passes `amount` readable bytes at `buf`.
        let data = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), amount as usize) };
        // SAFETY: a tracked file of ours.
        let key = unsafe { name(file) };
        if let Some(t) = st.files.get_mut(key) {
            t.pending.push(Op::Write(offset as u64, data.to_vec()));
        }
    }
    rc
}

unsafe extern "C" fn x_truncate(file: *mut ffi::sqlite3_file, size: ffi::sqlite3_int64) -> c_int {
    let mut st = state();
    if st.tick() {
        return ffi::SQLITE_IOERR_TRUNCATE;
    }
    let rc = forward!(file, xTruncate, size);
    if rc == ffi::SQLITE_OK {
        // SAFETY: a tracked file of ours.
        let key = unsafe { name(file) };
        if let Some(t) = st.files.get_mut(key) {
            t.pending.push(Op::Truncate(size as u64));
        }
    }
    rc
}

unsafe extern "C" fn x_sync(file: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    let mut st = state();
    if st.tick() {
        return ffi::SQLITE_IOERR_FSYNC;
    }
    let rc = forward!(file, xSync, flags);
    if rc == ffi::SQLITE_OK {
        // SAFETY: a tracked file of ours.
        let key = unsafe { name(file) };
        if let Some(t) = st.files.get_mut(key) {
            let mut image = t.durable.take().unwrap_or_default();
            for op in t.pending.drain(..) {
                op.apply(&mut image);
            }
            t.durable = Some(image);
        }
    }
    rc
}

unsafe extern "C" fn x_file_size(
    file: *mut ffi::sqlite3_file,
    size: *mut ffi::sqlite3_int64,
) -> c_int {
    forward!(file, xFileSize, size)
}

unsafe extern "C" fn x_lock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    forward!(file, xLock, level)
}

unsafe extern "C" fn x_unlock(file: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    forward!(file, xUnlock, level)
}

unsafe extern "C" fn x_check_reserved_lock(file: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    forward!(file, xCheckReservedLock, out)
}

unsafe extern "C" fn x_file_control(
    file: *mut ffi::sqlite3_file,
    op: c_int,
    arg: *mut c_void,
) -> c_int {
    forward!(file, xFileControl, op, arg)
}

unsafe extern "C" fn x_sector_size(file: *mut ffi::sqlite3_file) -> c_int {
    forward!(file, xSectorSize)
}

unsafe extern "C" fn x_device_characteristics(file: *mut ffi::sqlite3_file) -> c_int {
    forward!(file, xDeviceCharacteristics)
}

unsafe extern "C" fn x_shm_map(
    file: *mut ffi::sqlite3_file,
    page: c_int,
    size: c_int,
    extend: c_int,
    out: *mut *mut c_void,
) -> c_int {
    forward!(file, xShmMap, page, size, extend, out)
}

unsafe extern "C" fn x_shm_lock(
    file: *mut ffi::sqlite3_file,
    offset: c_int,
    n: c_int,
    flags: c_int,
) -> c_int {
    forward!(file, xShmLock, offset, n, flags)
}

unsafe extern "C" fn x_shm_barrier(file: *mut ffi::sqlite3_file) {
    // SAFETY: as in `forward!`.
    unsafe {
        let real = inner(file);
        if let Some(f) = (*(*real).pMethods).xShmBarrier {
            f(real);
        }
    }
}

unsafe extern "C" fn x_shm_unmap(file: *mut ffi::sqlite3_file, delete: c_int) -> c_int {
    forward!(file, xShmUnmap, delete)
}

unsafe extern "C" fn x_fetch(
    file: *mut ffi::sqlite3_file,
    offset: ffi::sqlite3_int64,
    amount: c_int,
    out: *mut *mut c_void,
) -> c_int {
    forward!(file, xFetch, offset, amount, out)
}

unsafe extern "C" fn x_unfetch(
    file: *mut ffi::sqlite3_file,
    offset: ffi::sqlite3_int64,
    p: *mut c_void,
) -> c_int {
    forward!(file, xUnfetch, offset, p)
}

static METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(x_close),
    xRead: Some(x_read),
    xWrite: Some(x_write),
    xTruncate: Some(x_truncate),
    xSync: Some(x_sync),
    xFileSize: Some(x_file_size),
    xLock: Some(x_lock),
    xUnlock: Some(x_unlock),
    xCheckReservedLock: Some(x_check_reserved_lock),
    xFileControl: Some(x_file_control),
    xSectorSize: Some(x_sector_size),
    xDeviceCharacteristics: Some(x_device_characteristics),
    xShmMap: Some(x_shm_map),
    xShmLock: Some(x_shm_lock),
    xShmBarrier: Some(x_shm_barrier),
    xShmUnmap: Some(x_shm_unmap),
    xFetch: Some(x_fetch),
    xUnfetch: Some(x_unfetch),
};

unsafe extern "C" fn x_open(
    _vfs: *mut ffi::sqlite3_vfs,
    path: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let real = real_vfs();
    let tracked = !path.is_null() && flags & (ffi::SQLITE_OPEN_MAIN_DB | ffi::SQLITE_OPEN_WAL) != 0;
    // SAFETY: `real` is the platform's VFS, which stays registered; SQLite
    // allocated our szOsFile (HEADER more than the platform's) at `file`.
    unsafe {
        let open = (*real).xOpen.expect("the platform's VFS opens files");
        if !tracked {
            // Temporary files: the platform's own, at the start of our space.
            return open(real, path, file, flags, out_flags);
        }
        let key = CStr::from_ptr(path).to_string_lossy().into_owned();
        let existing = std::fs::read(&key).ok();
        let header = file.cast::<Header>();
        (*header).base.pMethods = std::ptr::null();
        (*header).name = std::ptr::null_mut();
        let rc = open(real, path, inner(file), flags, out_flags);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
        state().files.entry(key.clone()).or_insert(Track {
            // A file found on disk counts as durable.
            durable: existing,
            pending: Vec::new(),
        });
        (*header).name = Box::into_raw(Box::new(key));
        (*header).base.pMethods = &METHODS;
        ffi::SQLITE_OK
    }
}

unsafe extern "C" fn x_delete(
    _vfs: *mut ffi::sqlite3_vfs,
    path: *const c_char,
    sync_dir: c_int,
) -> c_int {
    let mut st = state();
    if st.cut {
        return ffi::SQLITE_IOERR_DELETE;
    }
    let real = real_vfs();
    // SAFETY: the platform's VFS; `path` is SQLite's NUL-terminated path.
    unsafe {
        let rc = ((*real).xDelete.expect("the platform's VFS deletes"))(real, path, sync_dir);
        if rc == ffi::SQLITE_OK {
            st.files
                .remove(CStr::from_ptr(path).to_string_lossy().as_ref());
        }
        rc
    }
}

/// Test support: while held, this test owns the power cut (tests that use
/// it run one at a time). Dropping it switches the power back on.
pub struct PowerCut {
    _one: MutexGuard<'static, ()>,
}

/// Registers the VFS as SQLite's default (once per process) and starts a
/// fresh record of files, with the power on.
pub fn install() -> PowerCut {
    let one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    REAL.get_or_init(|| {
        // The copy registered below forwards everything but opening and
        // deleting to the original, whose methods find their own state
        // through the file, not the VFS (apart from pAppData, which the
        // copy keeps).
        // SAFETY: sqlite3_vfs_find(NULL) returns the default VFS, which lives as long as the process; the copy is leaked, so it does too.
        unsafe {
            let real = ffi::sqlite3_vfs_find(std::ptr::null());
            assert!(!real.is_null(), "SQLite has a default VFS");
            let mut ours = *real;
            ours.szOsFile = (*real).szOsFile + HEADER as c_int;
            ours.zName = c"powercut".as_ptr();
            ours.pNext = std::ptr::null_mut();
            ours.xOpen = Some(x_open);
            ours.xDelete = Some(x_delete);
            let ours = Box::into_raw(Box::new(ours));
            assert_eq!(ffi::sqlite3_vfs_register(ours, 1), ffi::SQLITE_OK);
            real as usize
        }
    });
    *state() = State::default();
    PowerCut { _one: one }
}

/// What [`PowerCut::restore`] put on disk.
#[derive(Debug, Default, Clone, Copy)]
pub struct Restored {
    /// Files written back.
    pub files: usize,
    /// Unsynced writes and truncates that survived the cut.
    pub kept: usize,
    /// Unsynced writes and truncates that were lost.
    pub lost: usize,
}

impl PowerCut {
    /// Cuts the power at the `n`-th write, truncate or sync from now (1:
    /// the next one), which fails, as does every one after it.
    pub fn cut_after(&self, n: u64) {
        state().countdown = Some(n.max(1));
    }

    /// Cuts the power now.
    pub fn cut_now(&self) {
        state().cut = true;
    }

    /// Whether the power is off.
    pub fn is_cut(&self) -> bool {
        state().cut
    }

    /// Writes, truncates and syncs seen since [`install`].
    pub fn ops(&self) -> u64 {
        state().ops
    }

    /// After the cut, with every connection to the files closed: puts on
    /// disk, for each file under `dir`, what survived (the synced content
    /// plus each unsynced write or truncate with probability 1/2, in order,
    /// chosen by `seed`; a file never synced survives only through such
    /// writes), removes the `-shm` files, and switches the power back on.
    pub fn restore(&self, dir: &Path, seed: u64) -> Restored {
        let mut st = state();
        assert!(st.cut, "restore after a cut");
        let mut rng = SplitMix64::new(seed);
        let mut restored = Restored::default();
        let under: Vec<String> = st
            .files
            .keys()
            .filter(|k| Path::new(k).starts_with(dir))
            .cloned()
            .collect();
        for key in under {
            let t = st.files.remove(&key).expect("listed");
            let mut image = t.durable.clone();
            for op in &t.pending {
                if rng.next_u64() & 1 == 0 {
                    op.apply(image.get_or_insert_with(Vec::new));
                    restored.kept += 1;
                } else {
                    restored.lost += 1;
                }
            }
            match image {
                Some(image) => std::fs::write(&key, image).expect("write the surviving image"),
                None => {
                    let _ = std::fs::remove_file(&key);
                }
            }
            restored.files += 1;
        }
        for entry in std::fs::read_dir(dir).expect("the directory").flatten() {
            if entry.file_name().to_string_lossy().ends_with("-shm") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        st.cut = false;
        st.countdown = None;
        restored
    }
}

impl Drop for PowerCut {
    fn drop(&mut self) {
        let mut st = state();
        st.cut = false;
        st.countdown = None;
    }
}
