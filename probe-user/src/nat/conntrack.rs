//! Following the kernel's conntrack table over netlink (next slice).
