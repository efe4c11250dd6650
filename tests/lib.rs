//! End-to-end suite; see e2e/.
