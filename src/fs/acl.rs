//! POSIX ACLs as the kernel hands them to a FUSE filesystem that asked for `FUSE_POSIX_ACL`:
//! the xattrs `system.posix_acl_access` and `system.posix_acl_default` in their binary form.
//!
//! The kernel enforces ACLs itself; what a filesystem must do (as ext4 does in
//! `posix_acl_update_mode` and `posix_acl_create`) is keep the mode bits and the access ACL in
//! step, and give new files and directories the parent's default ACL. Pure functions only.

pub const ACCESS: &[u8] = b"system.posix_acl_access";
pub const DEFAULT: &[u8] = b"system.posix_acl_default";

const VERSION: u32 = 2;
const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;
/// More entries than any real ACL has; bounds what a stick's record can make us parse.
const MAX_ENTRIES: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub tag: u16,
    pub perm: u16,
    pub id: u32,
}

/// Parses an ACL xattr; `None` if it is not a well-formed ACL (the caller answers EINVAL).
pub fn parse(value: &[u8]) -> Option<Vec<Entry>> {
    let (header, body) = value.split_at_checked(4)?;
    if u32::from_le_bytes(header.try_into().ok()?) != VERSION || body.len() % 8 != 0 {
        return None;
    }
    if body.len() / 8 > MAX_ENTRIES {
        return None;
    }
    let entries: Vec<Entry> = body
        .chunks_exact(8)
        .map(|c| Entry {
            tag: u16::from_le_bytes([c[0], c[1]]),
            perm: u16::from_le_bytes([c[2], c[3]]),
            id: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
        })
        .collect();
    let count = |t| entries.iter().filter(|e| e.tag == t).count();
    let known = entries.iter().all(|e| {
        matches!(e.tag, USER_OBJ | USER | GROUP_OBJ | GROUP | MASK | OTHER) && e.perm <= 7
    });
    let named = count(USER) + count(GROUP);
    let valid = known
        && count(USER_OBJ) == 1
        && count(GROUP_OBJ) == 1
        && count(OTHER) == 1
        && count(MASK) <= 1
        && (named == 0 || count(MASK) == 1);
    valid.then_some(entries)
}

pub fn serialize(entries: &[Entry]) -> Vec<u8> {
    let mut out = VERSION.to_le_bytes().to_vec();
    for e in entries {
        out.extend_from_slice(&e.tag.to_le_bytes());
        out.extend_from_slice(&e.perm.to_le_bytes());
        out.extend_from_slice(&e.id.to_le_bytes());
    }
    out
}

fn perm_of(entries: &[Entry], tag: u16) -> Option<u32> {
    entries
        .iter()
        .find(|e| e.tag == tag)
        .map(|e| u32::from(e.perm))
}

/// The permission bits an access ACL implies: owner, mask (or owning group), other.
pub fn mode_bits(entries: &[Entry]) -> u32 {
    let user = perm_of(entries, USER_OBJ).unwrap_or(0);
    let group = perm_of(entries, MASK)
        .or_else(|| perm_of(entries, GROUP_OBJ))
        .unwrap_or(0);
    let other = perm_of(entries, OTHER).unwrap_or(0);
    (user << 6) | (group << 3) | other
}

/// Whether the ACL says no more than the mode bits (then it is not stored, as on ext4).
pub fn is_minimal(entries: &[Entry]) -> bool {
    entries
        .iter()
        .all(|e| matches!(e.tag, USER_OBJ | GROUP_OBJ | OTHER))
}

/// `posix_acl_create_masq`: the access ACL of a new inode made from its parent's default ACL
/// and the mode it was created with; returns the ACL and the resulting permission bits.
pub fn create_masq(default: &[Entry], mode: u32) -> (Vec<Entry>, u32) {
    let mut acl = default.to_vec();
    let has_mask = acl.iter().any(|e| e.tag == MASK);
    let mut bits = mode & !0o777;
    for e in acl.iter_mut() {
        match e.tag {
            USER_OBJ => {
                e.perm &= ((mode >> 6) & 7) as u16;
                bits |= u32::from(e.perm) << 6;
            }
            GROUP_OBJ if !has_mask => {
                e.perm &= ((mode >> 3) & 7) as u16;
                bits |= u32::from(e.perm) << 3;
            }
            MASK => {
                e.perm &= ((mode >> 3) & 7) as u16;
                bits |= u32::from(e.perm) << 3;
            }
            OTHER => {
                e.perm &= (mode & 7) as u16;
                bits |= u32::from(e.perm);
            }
            _ => {}
        }
    }
    (acl, bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(tag: u16, perm: u16, id: u32) -> Entry {
        Entry { tag, perm, id }
    }

    #[test]
    fn round_trip_and_mode_bits() {
        let acl = vec![
            e(USER_OBJ, 7, 0),
            e(USER, 6, 1000),
            e(GROUP_OBJ, 5, 0),
            e(MASK, 4, 0),
            e(OTHER, 0, 0),
        ];
        let bytes = serialize(&acl);
        assert_eq!(parse(&bytes), Some(acl.clone()));
        assert_eq!(mode_bits(&acl), 0o740);
        assert!(!is_minimal(&acl));
        assert!(is_minimal(&[
            e(USER_OBJ, 6, 0),
            e(GROUP_OBJ, 4, 0),
            e(OTHER, 4, 0)
        ]));
    }

    #[test]
    fn malformed_acls_are_refused() {
        assert_eq!(parse(b""), None);
        assert_eq!(
            parse(&serialize(&[e(USER_OBJ, 7, 0)])),
            None,
            "no group or other"
        );
        let named_without_mask = [
            e(USER_OBJ, 7, 0),
            e(USER, 7, 5),
            e(GROUP_OBJ, 5, 0),
            e(OTHER, 0, 0),
        ];
        assert_eq!(parse(&serialize(&named_without_mask)), None);
        let mut bad_version = serialize(&[e(USER_OBJ, 7, 0), e(GROUP_OBJ, 5, 0), e(OTHER, 0, 0)]);
        bad_version[0] = 3;
        assert_eq!(parse(&bad_version), None);
    }

    #[test]
    fn create_masq_follows_the_creation_mode() {
        let default = [
            e(USER_OBJ, 7, 0),
            e(USER, 7, 1000),
            e(GROUP_OBJ, 5, 0),
            e(MASK, 7, 0),
            e(OTHER, 5, 0),
        ];
        let (acl, bits) = create_masq(&default, 0o100640);
        assert_eq!(bits, 0o100640);
        assert_eq!(perm_of(&acl, MASK), Some(4));
        assert_eq!(
            perm_of(&acl, GROUP_OBJ),
            Some(5),
            "the owning group entry is kept under a mask"
        );
        assert_eq!(perm_of(&acl, OTHER), Some(0));
    }
}
