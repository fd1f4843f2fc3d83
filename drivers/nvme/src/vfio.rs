//! VFIO transport (todo)
