//! The fair share: which partitions each live worker should own. Pure, so every worker computes
//! the same answer from the same membership.

/// The partitions `me` should own when `live` (sorted) are the live workers.
pub fn assignment(me: &str, live: &[String], partitions: u32) -> Vec<u32> {
    let Some(i) = live.iter().position(|w| w == me) else {
        return vec![];
    };
    (0..partitions)
        .filter(|p| *p as usize % live.len() == i)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignment_is_a_fair_partition_of_all_partitions() {
        let live: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let mut all: Vec<u32> = live.iter().flat_map(|w| assignment(w, &live, 16)).collect();
        all.sort();
        assert_eq!(all, (0..16).collect::<Vec<_>>());
        for w in &live {
            let n = assignment(w, &live, 16).len();
            assert!((5..=6).contains(&n), "{w}: {n}");
        }
        assert!(assignment("zz", &live, 16).is_empty());
    }
}
