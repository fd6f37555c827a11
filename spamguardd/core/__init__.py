"""The pure core: protocol, rates, buckets, policy, configuration, value types. No trio, no OS."""
