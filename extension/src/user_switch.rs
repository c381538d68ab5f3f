//! Acting as another role for a while, like a SECURITY DEFINER function.

use pgrx::pg_sys;

/// Switches the current user for as long as it lives, like a SECURITY
/// DEFINER function; an error unwinding through it also restores (so does
/// the (sub)transaction's abort).
pub struct UserSwitch {
    saved_user: pg_sys::Oid,
    saved_context: i32,
}

impl UserSwitch {
    pub fn to(user: pg_sys::Oid, restrictions: u32) -> Self {
        let mut saved_user = pg_sys::Oid::INVALID;
        let mut saved_context = 0;
        unsafe {
            pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_context);
            let context = saved_context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32 | restrictions as i32;
            pg_sys::SetUserIdAndSecContext(user, context);
        }
        UserSwitch { saved_user, saved_context }
    }
}

impl Drop for UserSwitch {
    fn drop(&mut self) {
        unsafe { pg_sys::SetUserIdAndSecContext(self.saved_user, self.saved_context) };
    }
}
