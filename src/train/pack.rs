//! Packing tokenized examples into fixed-length rows: best-fit-decreasing, so few
//! tokens are wasted. Documents in a row keep their own positions (restarting at 0)
//! and attention never crosses from one to the next ([`TokenBatch`] keeps their
//! lengths and the attention layout follows them).

use std::collections::BTreeMap;

use super::step::TokenBatch;

/// One tokenized training example.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    /// Unshifted labels, `-100` where not trained.
    pub labels: Vec<i64>,
}

impl Example {
    /// Cut to at most `seq_len` tokens (the tail is dropped, as HF trainers truncate).
    pub fn truncated(&self, seq_len: usize) -> Example {
        let n = self.ids.len().min(seq_len);
        Example { ids: self.ids[..n].to_vec(), labels: self.labels[..n].to_vec() }
    }
}

/// Best-fit-decreasing: items (lengths, each ≤ `capacity`) into as few bins as it
/// finds; each bin lists item indices. Deterministic: ties keep the input order.
pub fn best_fit_decreasing(lens: &[usize], capacity: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by(|&a, &b| lens[b].cmp(&lens[a]).then(a.cmp(&b)));
    let mut bins: Vec<Vec<usize>> = Vec::new();
    // remaining capacity -> bins with that much room, lowest index first
    let mut by_room: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for i in order {
        let len = lens[i].min(capacity);
        // the tightest bin it fits in: the first bin of the smallest room >= len
        let tightest =
            by_room.range_mut(len..).next().map(|(&room, list)| (room, list.remove(0), list.is_empty()));
        let bin = match tightest {
            Some((room, bin, emptied)) => {
                if emptied {
                    by_room.remove(&room);
                }
                bin
            }
            None => {
                bins.push(Vec::new());
                bins.len() - 1
            }
        };
        bins[bin].push(i);
        let used: usize = bins[bin].iter().map(|&j| lens[j].min(capacity)).sum();
        let list = by_room.entry(capacity - used).or_default();
        let at = list.partition_point(|&b| b < bin);
        list.insert(at, bin);
    }
    bins
}

/// Rows of examples: packed with best-fit-decreasing, or one example per row.
pub fn rows(examples: &[Example], seq_len: usize, packing: bool) -> Vec<Vec<usize>> {
    if packing {
        let lens: Vec<usize> = examples.iter().map(|e| e.ids.len().min(seq_len)).collect();
        best_fit_decreasing(&lens, seq_len)
    } else {
        (0..examples.len()).map(|i| vec![i]).collect()
    }
}

/// The batch made of the given rows (each a list of example indices).
pub fn batch_of(examples: &[Example], rows: &[Vec<usize>], seq_len: usize) -> TokenBatch {
    let mut b = TokenBatch::default();
    for row in rows {
        for &i in row {
            let e = examples[i].truncated(seq_len);
            if !e.ids.is_empty() {
                b.push(&e.ids, &e.labels);
            }
        }
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bfd_fills_bins_without_overflow_and_uses_every_item_once() {
        let lens = [90, 10, 60, 40, 30, 70, 5, 100, 20, 50];
        let bins = best_fit_decreasing(&lens, 100);
        let mut seen: Vec<usize> = bins.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..lens.len()).collect::<Vec<_>>());
        for b in &bins {
            assert!(b.iter().map(|&i| lens[i]).sum::<usize>() <= 100, "{b:?}");
        }
        // total 475 tokens: five bins of 100 is the optimum and BFD finds it here
        assert_eq!(bins.len(), 5);
        assert_eq!(best_fit_decreasing(&lens, 100), bins, "deterministic");
    }

    #[test]
    fn best_fit_picks_the_tightest_bin() {
        // 60 and 70 open two bins (rooms 40 and 30); 30 goes to the tighter one
        let bins = best_fit_decreasing(&[70, 60, 30], 100);
        assert_eq!(bins, vec![vec![0, 2], vec![1]]);
    }
}
