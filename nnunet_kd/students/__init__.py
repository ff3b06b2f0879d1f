"""The student side: student plans (width, depth, architecture), the growing teacher-assistant's master network, and
students that see fewer input channels than their teacher."""
