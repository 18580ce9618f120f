"""What is declared, not computed: the method specs (which tensors exist, train, travel) and the wire contract (every
field a site may send). Pure Python, no torch: the site's policy, the server and the site runtime all read them."""
