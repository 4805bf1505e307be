//! A1: the handle type, a counted reference to a beancounter's index. Lower layers (thread
//! contexts, spawn) hold and hand out these; what a handle can do is in `handle.rs`.

use super::registry::registry;
use super::types::BcId;
use core::fmt;

/// A handle to one beancounter. Cloning takes a reference; the beancounter lives while any
/// handle, thread context, RAII [`Charge`](crate::Charge) or charged object refers to it.
///
/// # Examples
/// ```
/// use beancounter::{BcId, Limits, Resource, Severity};
/// let tenant = beancounter::find_or_create(BcId(7)).unwrap();
/// tenant.set_limits(Resource::Threads, Limits::new(4, 4).unwrap()).unwrap();
/// let c = tenant.charge(Resource::Threads, 3, Severity::Limit).unwrap();
/// assert_eq!(tenant.stat(Resource::Threads).held, 3);
/// assert!(tenant.charge(Resource::Threads, 2, Severity::Limit).is_err());
/// drop(c);
/// assert_eq!(tenant.stat(Resource::Threads).held, 0);
/// ```
pub struct Beancounter {
    index: u32,
}

impl Beancounter {
    /// Wraps an index whose reference the caller hands over.
    pub(crate) fn from_owned_index(index: u32) -> Beancounter {
        Beancounter { index }
    }

    /// Takes a new reference on an index the caller knows to be referenced.
    pub(crate) fn from_borrowed_index(index: u32) -> Beancounter {
        registry().retain(index);
        Beancounter { index }
    }

    pub(crate) fn index(&self) -> u32 {
        self.index
    }

    /// This beancounter's id.
    ///
    /// # Examples
    /// ```
    /// use beancounter::BcId;
    /// let t = beancounter::find_or_create(BcId(110)).unwrap();
    /// assert_eq!(t.id(), BcId(110));
    /// assert_eq!(beancounter::root().id(), BcId::ROOT);
    /// ```
    pub fn id(&self) -> BcId {
        registry().id_of(self.index)
    }
}

impl Clone for Beancounter {
    fn clone(&self) -> Self {
        Beancounter::from_borrowed_index(self.index)
    }
}

impl Drop for Beancounter {
    fn drop(&mut self) {
        registry().release(self.index);
    }
}

impl PartialEq for Beancounter {
    fn eq(&self, other: &Self) -> bool {
        self.index == other.index
    }
}

impl Eq for Beancounter {}

impl fmt::Debug for Beancounter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Beancounter").field(&self.id()).finish()
    }
}
