//! Host memory for the weights the CPU kernels read from a copy (the rows4 layout): large
//! anonymous regions backed by 2 MiB pages, carved into one buffer per matrix in load order,
//! or the copies an earlier load left in a mapped [`weight cache`](super::weight_cache) file.
//!
//! Decode streams every weight once per token, and with 4 KiB pages every page of it is a TLB
//! miss. A matrix in its own allocation gets 2 MiB pages only over the part that covers whole
//! aligned 2 MiB spans, none at all under 2 MiB (most of the 0.5B's); matrices carved from one
//! region get them throughout.

use super::weight_cache::{CachedWeights, MappedWeights};
use anyhow::{Context, Result};
use memmap2::MmapMut;
use qwen_run_kernels::QuantType;
use std::sync::{Arc, Mutex};

const HUGE_PAGE: usize = 2 << 20;

/// Regions are at least this large; a larger matrix gets a region of its own size.
const REGION_BYTES: usize = 64 << 20;

/// Hands out [`WeightBuf`]s for one model load. Regions live as long as a buffer carved from
/// them, so dropping the model gives all of its memory back.
pub struct WeightArena {
    /// The region being carved, and how much of it is handed out.
    current: Mutex<Option<(Arc<Region>, usize)>>,
    huge_pages: bool,
    /// Copies made by an earlier load, used instead of repacking.
    cached: Option<CachedWeights>,
}

/// One anonymous mapping; `base`, its first 2 MiB boundary, starts `len` usable bytes.
struct Region {
    _map: MmapMut,
    base: *mut u8,
    len: usize,
}

// SAFETY: the mapping is written only through the disjoint ranges of the buffers carved from it.
unsafe impl Send for Region {}
unsafe impl Sync for Region {}

impl Region {
    fn new(len: usize, huge_pages: bool) -> Result<Region> {
        let mut map = MmapMut::map_anon(len + HUGE_PAGE)
            .with_context(|| format!("cannot map {} MiB for the repacked weights", len >> 20))?;
        let start = (map.as_mut_ptr() as usize).next_multiple_of(HUGE_PAGE) - map.as_ptr() as usize;
        #[cfg(target_os = "linux")]
        if huge_pages {
            // Where transparent huge pages are off, the advice is refused and 4 KiB pages serve.
            let _ = map.advise_range(memmap2::Advice::HugePage, start, len);
        }
        // SAFETY: start + len lies inside the mapping (len + HUGE_PAGE bytes).
        let base = unsafe { map.as_mut_ptr().add(start) };
        Ok(Region {
            _map: map,
            base,
            len,
        })
    }
}

impl WeightArena {
    /// `huge_pages`: ask for 2 MiB pages (on Linux; elsewhere, or where the system refuses,
    /// regions get ordinary pages).
    pub fn new(huge_pages: bool) -> WeightArena {
        WeightArena {
            current: Mutex::new(None),
            huge_pages,
            cached: None,
        }
    }

    /// An arena that hands out the copies `cached` holds before making any.
    pub fn with_cache(huge_pages: bool, cached: Option<CachedWeights>) -> WeightArena {
        WeightArena {
            cached,
            ..WeightArena::new(huge_pages)
        }
    }

    /// The rows4 copy of matrix `name` an earlier load stored, if there is one of this shape.
    pub fn cached(
        &self,
        name: &str,
        ty: QuantType,
        rows: usize,
        cols: usize,
    ) -> Option<MappedWeights> {
        self.cached.as_ref()?.get(name, ty, rows, cols)
    }

    /// A zeroed buffer of `len` bytes.
    pub fn alloc(&self, len: usize) -> Result<WeightBuf> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let fits = matches!(&*current, Some((r, used)) if r.len - used >= len);
        if !fits {
            *current = Some((
                Arc::new(Region::new(len.max(REGION_BYTES), self.huge_pages)?),
                0,
            ));
        }
        let (region, used) = current.as_mut().context("a region was just made")?;
        let offset = *used;
        // 64-byte aligned buffers: the kernels' loads then never straddle a cache line needlessly.
        *used = (offset + len).next_multiple_of(64).min(region.len);
        Ok(WeightBuf {
            region: region.clone(),
            offset,
            len,
        })
    }
}

/// `len` bytes of a region, owned by one matrix.
pub struct WeightBuf {
    region: Arc<Region>,
    offset: usize,
    len: usize,
}

// SAFETY: a WeightBuf is the only handle to its bytes (the arena hands each range out once), so
// it is shared and sent like a Box<[u8]>.
unsafe impl Send for WeightBuf {}
unsafe impl Sync for WeightBuf {}

impl std::ops::Deref for WeightBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: offset + len lies inside the region, which lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.region.base.add(self.offset), self.len) }
    }
}

impl std::ops::DerefMut for WeightBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and no other buffer covers these bytes.
        unsafe { std::slice::from_raw_parts_mut(self.region.base.add(self.offset), self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_disjoint_zeroed_and_outlive_the_arena() {
        let arena = WeightArena::new(true);
        let mut a = arena.alloc(1000).unwrap();
        let mut b = arena.alloc(REGION_BYTES + 5).unwrap();
        let mut c = arena.alloc(3000).unwrap();
        drop(arena);
        for (buf, v) in [(&mut a, 1u8), (&mut b, 2), (&mut c, 3)] {
            assert!(buf.iter().all(|&x| x == 0));
            buf.fill(v);
        }
        assert!(a.iter().all(|&x| x == 1));
        assert!(b.iter().all(|&x| x == 2));
        assert!(c.iter().all(|&x| x == 3));
        assert_eq!((a.len(), b.len(), c.len()), (1000, REGION_BYTES + 5, 3000));
        assert_eq!(a.as_ptr() as usize % 64, 0);
        assert_eq!(c.as_ptr() as usize % 64, 0);
    }
}
