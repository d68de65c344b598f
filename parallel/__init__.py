"""moe_train.parallel: device mesh, expert-parallel all-to-all dispatcher, gradient reduction."""
