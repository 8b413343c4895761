//! What a disk keeps across a snapshot besides its queue: whether a flush has failed (every
//! later one fails too, see `errors`). Requests in flight are none: a snapshot is taken
//! paused, after the device completed what it had taken. The rate limiter starts full again.

use serde::{Deserialize, Serialize};

use super::Block;
use crate::virtio::DeviceError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockState {
    pub flush_failed: bool,
}

impl Block {
    pub(super) fn save(&self) -> serde_json::Value {
        serde_json::to_value(BlockState {
            flush_failed: self.flush_failed,
        })
        .unwrap_or(serde_json::Value::Null)
    }

    pub(super) fn restore(&mut self, state: &serde_json::Value) -> Result<(), DeviceError> {
        let state: BlockState = serde_json::from_value(state.clone())
            .map_err(|e| DeviceError::Restore(format!("disk state: {e}")))?;
        self.flush_failed = state.flush_failed;
        Ok(())
    }
}
