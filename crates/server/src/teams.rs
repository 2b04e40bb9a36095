//! Teams: who may do what in a team, and its invites.
//!
//! Roles: the `owner` (who made the team) may do everything; an `admin` invites members,
//! removes members, sets the team's budgets and sees the team's usage as aggregates per
//! member; a `member` sees the team and its members. Nobody sees another member's
//! messages or prompts through a team: the team's usage route returns totals only. Every
//! team route starts from the caller's own membership, so a team they are not in answers
//! like a missing one.

use sha2::{Digest, Sha256};

/// A member's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Member,
    Admin,
    Owner,
}

impl Role {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "member" => Some(Role::Member),
            "admin" => Some(Role::Admin),
            "owner" => Some(Role::Owner),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::Member => "member",
            Role::Admin => "admin",
            Role::Owner => "owner",
        }
    }

    /// Admins and the owner manage the team: invites, removals, budgets, usage.
    pub fn manages(self) -> bool {
        self >= Role::Admin
    }

    /// Whether this role may invite someone as `role`: admins invite members, the owner
    /// invites admins too; nobody invites a second owner.
    pub fn may_invite(self, role: Role) -> bool {
        self.manages() && role < Role::Owner && (role == Role::Member || self == Role::Owner)
    }

    /// Whether this role may remove a member whose role is `target` (anyone may leave,
    /// except the owner, who would leave the team without one).
    /// Whether this role may change a member's role from `from` to `to`: only the owner,
    /// and never to or from owner (ownership does not move).
    pub fn may_change_role(self, from: Role, to: Role) -> bool {
        self == Role::Owner && from != Role::Owner && to != Role::Owner
    }

    pub fn may_remove(self, target: Role, themself: bool) -> bool {
        if themself {
            return target != Role::Owner;
        }
        self.manages() && target < self
    }
}

/// How long an invite can be used.
pub const INVITE_TTL_MS: i64 = 7 * 24 * 3600 * 1000;

/// A new invite token (shown once) and the digest it is stored and looked up by.
pub fn new_invite() -> (String, String) {
    use rand::RngCore;
    let mut bytes = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut bytes);
    let token = format!(
        "apt_{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    let digest = invite_digest(&token);
    (token, digest)
}

pub fn invite_digest(token: &str) -> String {
    Sha256::digest(token.trim().as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_manage_only_below_themselves() {
        use Role::*;
        assert!(Owner.may_invite(Admin) && Owner.may_invite(Member) && !Owner.may_invite(Owner));
        assert!(Admin.may_invite(Member) && !Admin.may_invite(Admin));
        assert!(!Member.may_invite(Member));
        assert!(Owner.may_remove(Admin, false) && Admin.may_remove(Member, false));
        assert!(!Admin.may_remove(Admin, false) && !Admin.may_remove(Owner, false));
        assert!(!Member.may_remove(Member, false));
        assert!(Member.may_remove(Member, true) && Admin.may_remove(Admin, true));
        assert!(!Owner.may_remove(Owner, true));
    }

    #[test]
    fn invites_are_random_and_stored_as_digests() {
        let (a, digest) = new_invite();
        let (b, _) = new_invite();
        assert_ne!(a, b);
        assert!(a.starts_with("apt_") && a.len() == 52);
        assert_eq!(invite_digest(&a), digest);
        assert!(!digest.contains(&a[4..]));
    }
}
