"""A contact form: email sent in a task, a follow-up later, a daily digest, thumbnails in a worker."""
