//! Recognising pershome's own entries after another computer moved them (issue 12, defect 3):
//! the body of a hard-link placeholder, which names the link's content wherever the
//! placeholder goes, and the match of a recorded directory that vanished to a new directory
//! by their contents, the way git detects renames. Pure: no I/O, no state; the filesystem's
//! reconciliation (`fs::reconcile`) and `pershome fsck` both decide with it, so they agree.
//! It must never guess: a match is made only when it is unambiguous (`match_dirs`).

use std::collections::HashMap;

use super::{Meta, PendingTree};
use crate::fatrules::fold_key;

/// The start of a hard-link placeholder's body (`docs/format.md` § Hard-link placeholders).
pub const PLACEHOLDER_MAGIC: &[u8] = b"!<pershome-link>";

/// The length of a placeholder's body: the magic and the link id as 16 lowercase hex digits.
pub const PLACEHOLDER_LEN: u64 = PLACEHOLDER_MAGIC.len() as u64 + 16;

/// The body of the placeholder file of a name of hard-link inode `id`.
pub fn placeholder_body(id: u64) -> Vec<u8> {
    let mut body = PLACEHOLDER_MAGIC.to_vec();
    body.extend_from_slice(format!("{id:016x}").as_bytes());
    body
}

/// The link id a placeholder body names, if `body` is exactly one (an id of 0 is none: ids
/// count from 1). Anything else, a user's file that happens to start alike included, is not.
pub fn parse_placeholder(body: &[u8]) -> Option<u64> {
    let hex = body.strip_prefix(PLACEHOLDER_MAGIC)?;
    if hex.len() != 16
        || !hex
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
    {
        return None;
    }
    let id = u64::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
    (id != 0).then_some(id)
}

/// The least similarity (matched weight over the union of both name sets) at which a new
/// directory is taken for a vanished one: 50 %, git's default for renames (`-M50%`).
pub const MIN_SIMILARITY_PERCENT: u64 = 50;

/// An entry of a new directory as listed on the stick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedChild {
    pub backing_name: Vec<u8>,
    pub is_dir: bool,
    pub size: u64,
}

/// A match: the vanished recorded directory `from` was renamed to the new directory `to`
/// (backing names in one parent directory), with their similarity as `matched / union`
/// entries (weights doubled: a name found with a different size counts as half).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirMatch {
    pub from: Vec<u8>,
    pub to: Vec<u8>,
    pub matched2: u64,
    pub union: u64,
}

impl DirMatch {
    pub fn percent(&self) -> u64 {
        self.matched2 * 50 / self.union.max(1)
    }
}

/// Whether a recorded entry stands for a directory: a `Dir` record, or records below it.
fn recorded_dir(t: &PendingTree) -> bool {
    match &t.meta {
        Some(m) => m.mode & libc::S_IFMT == libc::S_IFDIR,
        None => !t.children.is_empty() || t.base.is_some(),
    }
}

/// Whether a vanished record can be matched by content: a directory with records below it
/// (an empty one has nothing to compare).
pub fn matchable(t: &PendingTree) -> bool {
    recorded_dir(t)
        && (t.base.is_some()
            || t.children
                .values()
                .any(|c| c.meta.is_some() || !c.children.is_empty() || c.base.is_some()))
}

/// The similarity of a recorded directory's children and a listed directory's, as
/// `(matched × 2, union)`. Names are compared as Windows compares them (case-folded), since
/// that is how the stick finds them. A file recorded with a size (`backing_size`) that the
/// listed one no longer has was edited after the move: half a match. A hard-link name is
/// compared by name and kind only (its placeholder's size is not its content's).
fn similarity(recorded: &HashMap<Vec<u8>, PendingTree>, listed: &[ListedChild]) -> (u64, u64) {
    let listed_by_fold: HashMap<Vec<u8>, &ListedChild> = listed
        .iter()
        .map(|c| (fold_key(&c.backing_name), c))
        .collect();
    let mut matched2 = 0u64;
    let mut found = 0u64;
    let mut records = 0u64;
    for (name, t) in recorded {
        if t.meta.is_none() && t.children.is_empty() {
            continue;
        }
        records += 1;
        let Some(l) = listed_by_fold.get(&fold_key(name)) else {
            continue;
        };
        let is_dir = recorded_dir(t);
        if is_dir != l.is_dir {
            continue;
        }
        found += 1;
        let same_size = match &t.meta {
            Some(Meta { link: Some(_), .. }) | None => true,
            Some(m) => is_dir || m.backing_size == l.size,
        };
        matched2 += if same_size { 2 } else { 1 };
    }
    let union = records + listed.len() as u64 - found;
    (matched2, union)
}

/// Matches vanished recorded directories (`vanished`: backing name and records, all of one
/// parent) to new directories of the same parent that have no record (`candidates`: backing
/// name and listing). A pair is matched only when each is the other's single best (a tie for
/// either side matches nothing) and their similarity is at least `MIN_SIMILARITY_PERCENT`.
pub fn match_dirs(
    vanished: &[(&[u8], &PendingTree)],
    candidates: &[(&[u8], &[ListedChild])],
) -> Vec<DirMatch> {
    // scores[v][c] = (matched2, union), for pairs at or above the threshold.
    let mut scores: Vec<Vec<Option<(u64, u64)>>> = Vec::with_capacity(vanished.len());
    for (_, tree) in vanished {
        let row = candidates
            .iter()
            .map(|(_, listed)| {
                let (m2, u) = similarity(&tree.children, listed);
                (u > 0 && m2 * 50 >= MIN_SIMILARITY_PERCENT * u).then_some((m2, u))
            })
            .collect();
        scores.push(row);
    }
    // a/b compared with c/d without floating point.
    let cmp = |a: (u64, u64), b: (u64, u64)| (a.0 * b.1).cmp(&(b.0 * a.1));
    // The single best index of a row of scores, or None when there is none or a tie.
    let best = |row: &mut dyn Iterator<Item = (usize, Option<(u64, u64)>)>| {
        let mut top: Option<(usize, (u64, u64))> = None;
        let mut tied = false;
        for (i, s) in row {
            let Some(s) = s else { continue };
            match top {
                None => top = Some((i, s)),
                Some((_, t)) => match cmp(s, t) {
                    std::cmp::Ordering::Greater => {
                        top = Some((i, s));
                        tied = false;
                    }
                    std::cmp::Ordering::Equal => tied = true,
                    std::cmp::Ordering::Less => {}
                },
            }
        }
        if tied {
            None
        } else {
            top.map(|(i, _)| i)
        }
    };
    let mut out = Vec::new();
    for (v, row) in scores.iter().enumerate() {
        let Some(c) = best(&mut row.iter().copied().enumerate()) else {
            continue;
        };
        let Some(back) = best(&mut scores.iter().map(|r| r[c]).enumerate()) else {
            continue;
        };
        if back != v {
            continue;
        }
        let (matched2, union) = scores[v][c].unwrap_or_default();
        out.push(DirMatch {
            from: vanished[v].0.to_vec(),
            to: candidates[c].0.to_vec(),
            matched2,
            union,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(size: u64) -> PendingTree {
        PendingTree {
            meta: Some(Meta {
                mode: libc::S_IFREG | 0o600,
                backing_size: size,
                ..Meta::default()
            }),
            children: HashMap::new(),
            base: None,
        }
    }

    fn dir(children: &[(&str, PendingTree)]) -> PendingTree {
        PendingTree {
            meta: Some(Meta {
                mode: libc::S_IFDIR | 0o700,
                ..Meta::default()
            }),
            children: children
                .iter()
                .map(|(n, t)| (n.as_bytes().to_vec(), t.clone()))
                .collect(),
            base: None,
        }
    }

    fn listed(entries: &[(&str, bool, u64)]) -> Vec<ListedChild> {
        entries
            .iter()
            .map(|&(n, is_dir, size)| ListedChild {
                backing_name: n.as_bytes().to_vec(),
                is_dir,
                size,
            })
            .collect()
    }

    #[test]
    fn placeholders_round_trip_and_reject_lookalikes() {
        for id in [1, 0x1234, u64::MAX] {
            let body = placeholder_body(id);
            assert_eq!(body.len() as u64, PLACEHOLDER_LEN);
            assert_eq!(parse_placeholder(&body), Some(id));
        }
        assert_eq!(parse_placeholder(&placeholder_body(0)), None);
        assert_eq!(parse_placeholder(b"!<pershome-link>00000000000000AB"), None);
        assert_eq!(
            parse_placeholder(b"!<pershome-link>00000000000000ab\n"),
            None
        );
        assert_eq!(parse_placeholder(b""), None);
    }

    #[test]
    fn a_renamed_directory_is_matched_even_with_one_file_edited() {
        let proj = dir(&[("a.txt", file(3)), ("b.txt", file(5)), ("sub", dir(&[]))]);
        let new = listed(&[("a.txt", false, 3), ("B.TXT", false, 9), ("sub", true, 0)]);
        let other = listed(&[("x", false, 1)]);
        let m = match_dirs(
            &[(b"proj", &proj)],
            &[(b"Project Files", &new), (b"Other", &other)],
        );
        assert_eq!(m.len(), 1, "{m:?}");
        assert_eq!(m[0].to, b"Project Files");
        assert_eq!(m[0].percent(), 83);
    }

    #[test]
    fn two_equal_candidates_match_nothing() {
        let proj = dir(&[("a.txt", file(3)), ("b.txt", file(5))]);
        let copy = listed(&[("a.txt", false, 3), ("b.txt", false, 5)]);
        let m = match_dirs(&[(b"proj", &proj)], &[(b"One", &copy), (b"Two", &copy)]);
        assert_eq!(m, vec![]);
    }

    #[test]
    fn two_equal_vanished_directories_match_nothing() {
        let a = dir(&[("a.txt", file(3))]);
        let new = listed(&[("a.txt", false, 3)]);
        assert_eq!(
            match_dirs(&[(b"p", &a), (b"q", &a)], &[(b"N", &new)]),
            vec![]
        );
    }

    #[test]
    fn below_half_similar_is_no_match() {
        let proj = dir(&[("a.txt", file(3)), ("b.txt", file(5))]);
        let new = listed(&[("a.txt", false, 3), ("c", false, 1), ("d", false, 1)]);
        // 1 of a union of 4: 25 %.
        assert_eq!(match_dirs(&[(b"proj", &proj)], &[(b"N", &new)]), vec![]);
    }
}
