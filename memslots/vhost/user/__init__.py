"""vhost-user: the wire format (``wire``), the front-end that talks to a real back-end
(``frontend``) and the memslot consumer that keeps its memory table (``consumer``)."""
