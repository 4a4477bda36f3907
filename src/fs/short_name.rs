//! `Name`: a name as the inode table keeps it, held inline when it is short (issue 14, Scale:
//! memory per looked-up entry). Every entry of a loaded directory has its name twice (the
//! directory's key, the inode's own); most names of a home are short (`report.odt`,
//! `f000123.dat`), and a heap allocation costs malloc's 32-byte minimum for each. This module
//! owns that representation only: it compares, hashes and orders exactly as the bytes do, so
//! a map keyed by `Name` is looked up with a `&[u8]`.

use std::borrow::Borrow;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;

/// Names of up to this many bytes are kept inline (the size of the heap form, less the tag
/// and the length byte).
const INLINE: usize = 22;

/// A byte string: inline up to `INLINE` bytes, boxed above. 24 bytes either way.
#[derive(Clone)]
pub(crate) enum Name {
    Inline { len: u8, bytes: [u8; INLINE] },
    Heap(Box<[u8]>),
}

impl Default for Name {
    fn default() -> Name {
        Name::Inline {
            len: 0,
            bytes: [0; INLINE],
        }
    }
}

impl From<&[u8]> for Name {
    fn from(name: &[u8]) -> Name {
        if name.len() <= INLINE {
            let mut bytes = [0; INLINE];
            bytes[..name.len()].copy_from_slice(name);
            Name::Inline {
                len: name.len() as u8,
                bytes,
            }
        } else {
            Name::Heap(name.into())
        }
    }
}

impl From<Vec<u8>> for Name {
    fn from(name: Vec<u8>) -> Name {
        if name.len() <= INLINE {
            Name::from(name.as_slice())
        } else {
            Name::Heap(name.into_boxed_slice())
        }
    }
}

impl Deref for Name {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Name::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Name::Heap(b) => b,
        }
    }
}

impl Borrow<[u8]> for Name {
    fn borrow(&self) -> &[u8] {
        self
    }
}

impl PartialEq for Name {
    fn eq(&self, other: &Name) -> bool {
        **self == **other
    }
}

impl Eq for Name {}

impl PartialOrd for Name {
    fn partial_cmp(&self, other: &Name) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Name {
    fn cmp(&self, other: &Name) -> std::cmp::Ordering {
        (**self).cmp(&**other)
    }
}

impl Hash for Name {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (**self).hash(state)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn a_name_is_24_bytes_and_short_ones_need_no_heap() {
        assert_eq!(std::mem::size_of::<Name>(), 24);
        assert!(matches!(
            Name::from(&b"f000123.dat"[..]),
            Name::Inline { .. }
        ));
        assert!(matches!(Name::from(&[b'x'; 22][..]), Name::Inline { .. }));
        assert!(matches!(Name::from(&[b'x'; 23][..]), Name::Heap(_)));
    }

    #[test]
    fn names_order_and_compare_as_their_bytes() {
        let names: Vec<Vec<u8>> = vec![
            Vec::new(),
            b"a".to_vec(),
            b"a\0".to_vec(),
            b"ab".to_vec(),
            vec![b'a'; 22],
            vec![b'a'; 23],
            vec![b'a'; 200],
            b"b".to_vec(),
            vec![0xff; 30],
        ];
        let mut map = BTreeMap::new();
        for (i, n) in names.iter().enumerate() {
            map.insert(Name::from(n.clone()), i);
        }
        let listed: Vec<Vec<u8>> = map.keys().map(|n| n.to_vec()).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(listed, sorted);
        for (i, n) in names.iter().enumerate() {
            assert_eq!(map.get(n.as_slice()), Some(&i), "{n:?}");
            assert_eq!(&*Name::from(n.as_slice()), n.as_slice());
        }
        assert_eq!(map.get(&b"a\0\0"[..]), None);
    }
}
