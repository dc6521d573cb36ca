"""vhost back-ends as memslot consumers: vhost-kernel and vhost-user."""
